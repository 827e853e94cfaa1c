// The kernel half of segmesh's data plane for spliced flows (docs/design.md, "BPF
// sockmap"). Once the enforcer has allowed a flow, it puts both of the flow's sockets
// in TARGETS (where redirects look them up), records each one's peer in DIRS and a
// budget in LIMITS, and then puts both in SOURCES, the map this stream verdict is
// attached to. From then on every byte that arrives on one socket is redirected by the
// kernel to the other socket's send queue without waking the enforcer.
//
// The kernel gives redirected bytes no back-pressure: they wait in the peer's backlog,
// uncharged to either socket, for as long as the peer's send queue is full. So the
// verdict counts, per source socket, the bytes it redirected and their cost (bytes plus
// an estimate of each buffer's overhead), and when the cost crosses the budget the
// enforcer set, it tells the enforcer once (a record in EVENTS). The enforcer then
// looks at what the peer has taken (TCP_INFO) and either grants a new budget or holds
// the direction: the verdict passes its bytes to the source socket's own receive
// queue (SK_PASS), where they are charged to the socket and TCP's flow control holds
// the sender, and the enforcer forwards them itself once the backlog has drained. To
// keep bytes in order, the verdict redirects again only when the enforcer has forwarded
// every byte it held (`held == acked`).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MAX_SOCKETS 65536
// What one buffer costs besides its bytes (struct sk_buff and its shared info, about).
#define SKB_COST 512

// One direction of a flow, keyed by the socket cookie of its source. The enforcer
// writes it once; afterwards only this program changes it (one socket's verdicts run
// one at a time, under the socket's lock).
struct dir {
	__u64 peer;  // socket cookie of the socket the bytes go to
	__u64 bytes; // bytes redirected so far
	__u64 cost;  // bytes plus SKB_COST per buffer, so far
	__u64 held;  // bytes passed to the source's own receive queue, so far
};

// What the enforcer says about a direction (only it writes these).
struct ctrl {
	__u64 limit;  // the cost at which to tell the enforcer
	__u64 paused; // pass bytes to the source's receive queue instead
	__u64 acked;  // held bytes the enforcer has forwarded
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u32);
} SOURCES SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, __u32);
} TARGETS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__type(key, __u64);
	__type(value, struct dir);
} DIRS SEC(".maps");

// Source cookie -> what the enforcer says. Not preallocated: an update replaces the
// element and frees the old one after an RCU grace period, so a verdict reading it
// never sees another direction's values.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SOCKETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct ctrl);
} CTRL SEC(".maps");

// Source cookies whose budget ran out. Each source has at most one record waiting (the
// enforcer sets the next budget after reading it): 65,536 records of 16 bytes fit.
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} EVENTS SEC(".maps");

SEC("sk_skb/stream_verdict")
int segmesh_redirect(struct __sk_buff *skb)
{
	// The FIN arrives as an empty buffer. Redirected, the peer's backlog would send
	// zero bytes, which the kernel takes for a broken pipe (EPIPE on the peer); the
	// enforcer passes the FIN on itself, once the direction's bytes have drained.
	if (skb->len == 0)
		return SK_DROP;
	__u64 me = bpf_get_socket_cookie(skb);
	struct dir *d = bpf_map_lookup_elem(&DIRS, &me);
	// A socket in SOURCES always has its direction, but while a flow is taken apart
	// (SOURCES first, then DIRS and CTRL): bytes of a flow being closed are dropped.
	if (!d)
		return SK_DROP;
	struct ctrl *c = bpf_map_lookup_elem(&CTRL, &me);
	if (!c)
		return SK_DROP;
	// Plain stores: this socket's verdicts are serialized, and 64-bit stores are
	// atomic for the enforcer's reads.
	if (c->paused || d->held != c->acked) {
		d->held += skb->len;
		return SK_PASS;
	}
	__u64 peer = d->peer;
	__u64 before = d->cost;
	__u64 after = before + skb->len + SKB_COST;
	d->bytes += skb->len;
	d->cost = after;
	if (before <= c->limit && after > c->limit)
		bpf_ringbuf_output(&EVENTS, &me, sizeof(me), 0);
	return bpf_sk_redirect_hash(skb, &TARGETS, &peer, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
