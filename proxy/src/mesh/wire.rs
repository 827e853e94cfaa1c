//! The mesh tunnel's wire format (ALPN `segmesh/2`). No I/O here: the requests and
//! answers as HTTP/2 messages, the ticket preface, datagram frames, strict decoding and
//! the reason codes.
//!
//! One TLS 1.3 connection between two enforcers carries HTTP/2; every flow is one
//! `CONNECT` stream on it (the way ztunnel's HBONE does), so a flow pays no handshake:
//!
//! - Request: `CONNECT <target ip>:<port>`, with `segmesh-encrypt: 1` when the client's
//!   decision wants encryption and `segmesh-protocol: udp` for a UDP session (always
//!   encrypted). Nothing else is read; nothing in it says who the client is or what tags
//!   it has: those come only from its certificate.
//! - Answer: a status and `segmesh-reason` (`accepted` with 200; `policy` or `default`
//!   with 403; `no-snapshot` or `overload` with 503; `bad-request` with 400; `unreachable`
//!   with 502). An encrypted flow's bytes then travel in the stream. An authenticated-only
//!   flow's answer carries `segmesh-ticket: <64 hex digits>` instead: 32 random bytes the
//!   client presents, once, on a new plain TCP connection to the tunnel port as the
//!   [`PREFACE_LEN`]-byte preface `SMT 0x02 | ticket`, after which the bytes of the flow
//!   follow unframed (spliced at both ends). A ticket in the answer to a request that
//!   asked for encryption is a protocol violation (the client refuses the flow).
//! - Ticket books (authenticated-only flows without a request each): `GET
//!   https://segmesh.tunnel/tickets` with `segmesh-count: N` (1 to [`MAX_BOOK`]) asks
//!   for up to N single-use tickets; the answer is 200 `accepted` with `segmesh-tickets:`
//!   their hex digits, concatenated (fewer than asked, or none, when the server's bound
//!   on a connection's tickets is reached). Such a ticket stands for the connection's
//!   identity, not for a flow: the client presents it as the [`BOOK_PREFACE_LEN`]-byte
//!   preface `SMT 0x03 | ticket | port u16 BE` on a new plain TCP connection to the
//!   tunnel port; the server decides the flow there, on the tags of the certificate the
//!   ticket was issued to, and answers with one byte, the [`Reason::code`]: `accepted`,
//!   after which the flow's bytes follow unframed, or a refusal, after which it closes.
//!   `encrypt` refuses because the server's decision wants encryption (the client asks
//!   again on a stream, encrypted); `ticket` refuses a ticket that is unknown, used,
//!   expired, issued on a connection that has ended, or presented from another address
//!   (the client asks again on a stream).
//! - Moving flows (authenticated-only flows that start on their stream): the request
//!   carries `segmesh-movable: 1` (never with encryption or UDP). Where the server's
//!   decision does not want encryption either, its `accepted` answer carries
//!   `segmesh-move: <64 hex digits>`, a single-use ticket for *this stream's flow*; the
//!   flow's bytes start in the stream (inside TLS), and the client may later present the
//!   ticket as the [`PREFACE_LEN`]-byte preface `SMT 0x04 | ticket` on a new plain TCP
//!   connection to the tunnel port. The server answers with one byte (`accepted`, or
//!   `ticket` for an unknown, used or foreign one); after `accepted` each end finishes
//!   its sending direction of the stream with the trailer `segmesh-moved: 1` and sends
//!   the rest of that direction on the new connection, unframed; each end reads a
//!   direction from the stream until that trailer, then from the connection. A direction
//!   that ended (a FIN) before the move ends its stream without the trailer, as always.
//! - UDP sessions: each datagram travels in the stream as a frame `length u16 BE |
//!   payload` (at most [`MAX_DATAGRAM`] bytes; an empty datagram is a frame of length 0).

use std::net::SocketAddr;

/// Request header: the client's decision wants encryption (`1`).
pub const H_ENCRYPT: &str = "segmesh-encrypt";
/// Request header: `udp` for a UDP session (absent: TCP).
pub const H_PROTOCOL: &str = "segmesh-protocol";
/// Answer header: the reason code.
pub const H_REASON: &str = "segmesh-reason";
/// Answer header: the single-use ticket of an authenticated-only flow.
pub const H_TICKET: &str = "segmesh-ticket";
/// Request header: an authenticated-only flow that starts on its stream and may move to
/// a connection of its own (`1`).
pub const H_MOVABLE: &str = "segmesh-movable";
/// Answer header: the ticket that moves this stream's flow to a connection of its own.
pub const H_MOVE: &str = "segmesh-move";
/// Trailer: the rest of this direction of the flow follows on its moved connection.
pub const H_MOVED: &str = "segmesh-moved";

/// The ticket preface's first four bytes. The first is not a TLS record type (0x16),
/// which is how the tunnel port tells a ticket from a TLS handshake.
pub const MAGIC: [u8; 4] = *b"SMT\x02";
pub const TICKET_LEN: usize = 32;
pub const PREFACE_LEN: usize = MAGIC.len() + TICKET_LEN;
/// The preface of a ticket from a book: `SMT 0x03 | ticket | port`.
pub const MAGIC_BOOK: [u8; 4] = *b"SMT\x03";
pub const BOOK_PREFACE_LEN: usize = MAGIC_BOOK.len() + TICKET_LEN + 2;
/// The preface that moves a flow: `SMT 0x04 | ticket` ([`PREFACE_LEN`] bytes).
pub const MAGIC_MOVE: [u8; 4] = *b"SMT\x04";
/// Request header: how many tickets a book request asks for.
pub const H_COUNT: &str = "segmesh-count";
/// Answer header: a book's tickets, hex, concatenated.
pub const H_TICKETS: &str = "segmesh-tickets";
/// The most tickets one book request asks for (and one answer carries).
pub const MAX_BOOK: usize = 64;
/// The path of a book request.
pub const BOOK_PATH: &str = "/tickets";

/// The largest datagram a frame carries.
pub const MAX_DATAGRAM: usize = 65_507;

/// One datagram as a frame.
pub fn frame(datagram: &[u8]) -> Vec<u8> {
    let n = datagram.len().min(MAX_DATAGRAM);
    let mut out = Vec::with_capacity(2 + n);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(&datagram[..n]);
    out
}

/// A frame's length field, checked.
pub fn frame_len(header: [u8; 2]) -> Result<usize, WireError> {
    let n = u16::from_be_bytes(header) as usize;
    if n > MAX_DATAGRAM {
        return Err(WireError::TooLong(n));
    }
    Ok(n)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub port: u16,
    pub encrypt: bool,
    /// A UDP session (datagrams framed inside the stream).
    pub udp: bool,
    /// Authenticated-only, starting on the stream (may move to a connection of its own).
    pub movable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Accepted,
    /// An enforced policy rejected it.
    Policy,
    /// No enforced policy matched.
    Default,
    /// The server has no valid configuration.
    NoSnapshot,
    /// The request was malformed.
    BadRequest,
    /// The server is at its connection limit.
    Overload,
    /// The server could not reach its workload.
    Unreachable,
    /// (A ticket from a book.) The server's decision wants encryption: ask on a stream.
    Encrypt,
    /// (A ticket from a book.) Unknown, used, expired, its connection gone, or not from
    /// its holder's address: ask on a stream.
    Ticket,
}

/// A single-use ticket for an authenticated-only flow.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub [u8; TICKET_LEN]);

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret itself, in logs or panics.
        f.write_str("Ticket(..)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub reason: Reason,
    /// Authenticated-only: the flow's bytes go on a new connection with this ticket.
    pub ticket: Option<Ticket>,
    /// Authenticated-only, started on the stream: the ticket that moves it.
    pub moves: Option<Ticket>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a datagram frame of {0} bytes exceeds the limit of {MAX_DATAGRAM}")]
    TooLong(usize),
    #[error("not a CONNECT request")]
    Method,
    #[error("no target port, or port 0")]
    Port,
    #[error("bad header {0}")]
    Header(&'static str),
    #[error("the status does not match the reason")]
    Status,
    #[error("not a ticket preface")]
    Preface,
    #[error("not a ticket book request")]
    Book,
}

impl Reason {
    const ALL: [(Reason, &'static str, u16); 9] = [
        (Reason::Accepted, "accepted", 200),
        (Reason::Policy, "policy", 403),
        (Reason::Default, "default", 403),
        (Reason::NoSnapshot, "no-snapshot", 503),
        (Reason::BadRequest, "bad-request", 400),
        (Reason::Overload, "overload", 503),
        (Reason::Unreachable, "unreachable", 502),
        (Reason::Encrypt, "encrypt", 403),
        (Reason::Ticket, "ticket", 403),
    ];

    /// The one-byte answer on a book ticket's connection.
    pub fn code(self) -> u8 {
        Self::ALL
            .iter()
            .position(|(r, ..)| *r == self)
            .expect("all") as u8
    }

    pub fn from_code(c: u8) -> Option<Reason> {
        Self::ALL.get(c as usize).map(|(r, ..)| *r)
    }

    pub fn as_str(self) -> &'static str {
        Self::ALL.iter().find(|(r, ..)| *r == self).expect("all").1
    }

    fn status(self) -> u16 {
        Self::ALL.iter().find(|(r, ..)| *r == self).expect("all").2
    }

    fn parse(s: &[u8]) -> Option<Reason> {
        Self::ALL
            .iter()
            .find(|(_, n, _)| n.as_bytes() == s)
            .map(|(r, ..)| *r)
    }
}

/// Fills `b` from the TLS provider's secure random source.
fn fill_random(b: &mut [u8]) {
    segmesh_identity::tls::provider()
        .secure_random
        .fill(b)
        .expect("the system's random source works");
}

impl Ticket {
    /// 32 bytes from the TLS provider's secure random source.
    pub fn random() -> Ticket {
        let mut b = [0u8; TICKET_LEN];
        fill_random(&mut b);
        Ticket(b)
    }

    /// `n` tickets from one call to the secure random source.
    pub fn random_n(n: usize) -> Vec<Ticket> {
        let mut b = vec![0u8; n * TICKET_LEN];
        fill_random(&mut b);
        b.chunks_exact(TICKET_LEN)
            .map(|c| Ticket(c.try_into().expect("a ticket's length")))
            .collect()
    }

    /// 64 lowercase hex digits, in one allocation (the server writes one into the
    /// answer of every movable flow, and a book holds many).
    pub fn to_hex(self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(2 * TICKET_LEN);
        for b in self.0 {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
        }
        s
    }

    /// Exactly 64 lowercase hex digits.
    pub fn from_hex(s: &[u8]) -> Result<Ticket, WireError> {
        let bad = WireError::Header(H_TICKET);
        if s.len() != 2 * TICKET_LEN {
            return Err(bad);
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(bad.clone()),
        };
        let mut out = [0u8; TICKET_LEN];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(Ticket(out))
    }

    pub fn preface(self) -> [u8; PREFACE_LEN] {
        self.preface_with(MAGIC)
    }

    pub fn from_preface(p: &[u8; PREFACE_LEN]) -> Result<Ticket, WireError> {
        Self::from_preface_with(MAGIC, p)
    }

    /// The preface that moves this ticket's flow to the connection it opens.
    pub fn move_preface(self) -> [u8; PREFACE_LEN] {
        self.preface_with(MAGIC_MOVE)
    }

    pub fn from_move_preface(p: &[u8; PREFACE_LEN]) -> Result<Ticket, WireError> {
        Self::from_preface_with(MAGIC_MOVE, p)
    }

    fn preface_with(self, magic: [u8; 4]) -> [u8; PREFACE_LEN] {
        let mut p = [0u8; PREFACE_LEN];
        p[..magic.len()].copy_from_slice(&magic);
        p[magic.len()..].copy_from_slice(&self.0);
        p
    }

    fn from_preface_with(magic: [u8; 4], p: &[u8; PREFACE_LEN]) -> Result<Ticket, WireError> {
        if p[..magic.len()] != magic {
            return Err(WireError::Preface);
        }
        let mut t = [0u8; TICKET_LEN];
        t.copy_from_slice(&p[magic.len()..]);
        Ok(Ticket(t))
    }

    /// The preface of a book ticket used for a flow to `port`.
    pub fn book_preface(self, port: u16) -> [u8; BOOK_PREFACE_LEN] {
        let mut p = [0u8; BOOK_PREFACE_LEN];
        p[..MAGIC_BOOK.len()].copy_from_slice(&MAGIC_BOOK);
        p[MAGIC_BOOK.len()..MAGIC_BOOK.len() + TICKET_LEN].copy_from_slice(&self.0);
        p[MAGIC_BOOK.len() + TICKET_LEN..].copy_from_slice(&port.to_be_bytes());
        p
    }

    /// The ticket and the port (not 0) of a book ticket's preface.
    pub fn from_book_preface(p: &[u8; BOOK_PREFACE_LEN]) -> Result<(Ticket, u16), WireError> {
        if p[..MAGIC_BOOK.len()] != MAGIC_BOOK {
            return Err(WireError::Preface);
        }
        let mut t = [0u8; TICKET_LEN];
        t.copy_from_slice(&p[MAGIC_BOOK.len()..MAGIC_BOOK.len() + TICKET_LEN]);
        let port = u16::from_be_bytes([p[BOOK_PREFACE_LEN - 2], p[BOOK_PREFACE_LEN - 1]]);
        if port == 0 {
            return Err(WireError::Port);
        }
        Ok((Ticket(t), port))
    }
}

/// A request for a book of up to `n` tickets.
pub fn book_request(n: usize) -> http::Request<()> {
    http::Request::get(format!("https://segmesh.tunnel{BOOK_PATH}"))
        .header(H_COUNT, n.clamp(1, MAX_BOOK))
        .body(())
        .expect("a valid request")
}

/// Whether `r` asks for a book (`Ok(None)`: it does not, it is a flow's request) and
/// for how many tickets.
pub fn book_count<B>(r: &http::Request<B>) -> Result<Option<usize>, WireError> {
    if r.method() == http::Method::CONNECT {
        return Ok(None);
    }
    if r.method() != http::Method::GET || r.uri().path() != BOOK_PATH {
        return Err(WireError::Book);
    }
    let n = r
        .headers()
        .get(H_COUNT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=MAX_BOOK).contains(n))
        .ok_or(WireError::Header(H_COUNT))?;
    Ok(Some(n))
}

/// The answer to a book request: the tickets issued (possibly none).
pub fn book_answer(tickets: &[Ticket]) -> http::Response<()> {
    let hex: String = tickets.iter().map(|t| t.to_hex()).collect();
    http::Response::builder()
        .status(Reason::Accepted.status())
        .header(H_REASON, Reason::Accepted.as_str())
        .header(H_TICKETS, hex)
        .body(())
        .expect("valid status and headers")
}

/// The tickets of a book answer; strict (at most [`MAX_BOOK`], each 64 lowercase hex
/// digits).
pub fn book_from_http(
    status: http::StatusCode,
    headers: &http::HeaderMap,
) -> Result<Vec<Ticket>, WireError> {
    let r = Response::from_http(status, headers)?;
    if !r.accept() || r.ticket.is_some() || r.moves.is_some() {
        return Err(WireError::Book);
    }
    let hex = headers
        .get(H_TICKETS)
        .ok_or(WireError::Header(H_TICKETS))?
        .as_bytes();
    if hex.len() % (2 * TICKET_LEN) != 0 || hex.len() > MAX_BOOK * 2 * TICKET_LEN {
        return Err(WireError::Header(H_TICKETS));
    }
    hex.chunks_exact(2 * TICKET_LEN)
        .map(|h| Ticket::from_hex(h).map_err(|_| WireError::Header(H_TICKETS)))
        .collect()
}

impl Request {
    /// The request for a flow to `target` (its port is the workload's).
    pub fn to_http(self, target: SocketAddr) -> http::Request<()> {
        let mut b = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string());
        if self.encrypt {
            b = b.header(H_ENCRYPT, "1");
        }
        if self.udp {
            b = b.header(H_PROTOCOL, "udp");
        }
        if self.movable {
            b = b.header(H_MOVABLE, "1");
        }
        b.body(()).expect("a socket address is a valid authority")
    }

    pub fn from_http<B>(r: &http::Request<B>) -> Result<Request, WireError> {
        if r.method() != http::Method::CONNECT {
            return Err(WireError::Method);
        }
        let port = r
            .uri()
            .port_u16()
            .filter(|p| *p != 0)
            .ok_or(WireError::Port)?;
        let flag = |name: &'static str, yes: &[u8]| match r.headers().get(name) {
            None => Ok(false),
            Some(v) if v.as_bytes() == yes => Ok(true),
            Some(_) => Err(WireError::Header(name)),
        };
        let (encrypt, udp) = (flag(H_ENCRYPT, b"1")?, flag(H_PROTOCOL, b"udp")?);
        let movable = flag(H_MOVABLE, b"1")?;
        // Only an authenticated-only TCP flow moves.
        if movable && (encrypt || udp) {
            return Err(WireError::Header(H_MOVABLE));
        }
        Ok(Request {
            port,
            encrypt,
            udp,
            movable,
        })
    }
}

impl Response {
    pub fn refused(reason: Reason) -> Response {
        Response {
            reason,
            ticket: None,
            moves: None,
        }
    }

    pub fn accept(&self) -> bool {
        self.reason == Reason::Accepted
    }

    pub fn to_http(self) -> http::Response<()> {
        let mut b = http::Response::builder()
            .status(self.reason.status())
            .header(H_REASON, self.reason.as_str());
        if let Some(t) = self.ticket {
            b = b.header(H_TICKET, t.to_hex());
        }
        if let Some(t) = self.moves {
            b = b.header(H_MOVE, t.to_hex());
        }
        b.body(()).expect("valid status and headers")
    }

    /// Strict: a known reason that matches the status; a ticket only with an accept, and
    /// not both kinds.
    pub fn from_http(
        status: http::StatusCode,
        headers: &http::HeaderMap,
    ) -> Result<Response, WireError> {
        let reason = headers
            .get(H_REASON)
            .and_then(|v| Reason::parse(v.as_bytes()))
            .ok_or(WireError::Header(H_REASON))?;
        if status.as_u16() != reason.status() {
            return Err(WireError::Status);
        }
        let ticket_in = |name: &'static str| match headers.get(name) {
            None => Ok(None),
            Some(_) if reason != Reason::Accepted => Err(WireError::Header(name)),
            Some(v) => Ticket::from_hex(v.as_bytes())
                .map(Some)
                .map_err(|_| WireError::Header(name)),
        };
        let (ticket, moves) = (ticket_in(H_TICKET)?, ticket_in(H_MOVE)?);
        if ticket.is_some() && moves.is_some() {
            return Err(WireError::Header(H_MOVE));
        }
        Ok(Response {
            reason,
            ticket,
            moves,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz target: what a server reads from a peer (the request's method, target and
    /// flags, a ticket preface, datagram frames) and what a client reads in an answer.
    /// Nothing panics; what decodes encodes back the same.
    #[test]
    fn fuzz_tunnel_header() {
        let t = Ticket([7; TICKET_LEN]);
        let seeds: Vec<Vec<u8>> = vec![
            b"CONNECT\n10.0.0.2:8080\n1\n\n".to_vec(),
            b"CONNECT\n[fd00::2]:53\n\nudp\n".to_vec(),
            b"GET\n/\n\n\n".to_vec(),
            [t.preface().to_vec(), frame(b"query"), frame(b"")].concat(),
            format!("200\naccepted\n{}", t.to_hex()).into_bytes(),
            b"403\npolicy\n".to_vec(),
            t.book_preface(443).to_vec(),
            t.to_hex().repeat(2).into_bytes(),
        ];
        let refs: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
        segmesh_testkit::fuzz::run(
            "tunnel-header",
            &refs,
            &[
                b"CONNECT",
                b"\n",
                b":",
                b"udp",
                &MAGIC,
                &MAGIC_BOOK,
                b"accepted",
                b"200",
            ],
            |input| {
                let parts: Vec<&[u8]> = input.split(|b| *b == b'\n').collect();
                let part = |i: usize| parts.get(i).copied().unwrap_or(b"");
                // A request as the h2 crate would hand it over (what it accepts as method, URI
                // and header values; the rest never reaches us).
                let req = http::Request::builder()
                    .method(part(0))
                    .uri(part(1))
                    .header(H_ENCRYPT, part(2))
                    .header(H_PROTOCOL, part(3))
                    .body(());
                if let Ok(req) = req {
                    if let Ok(r) = Request::from_http(&req) {
                        let target = SocketAddr::from(([10, 0, 0, 2], r.port));
                        assert_eq!(Request::from_http(&r.to_http(target)).unwrap(), r);
                    }
                }
                if let (Ok(status), Ok(reason), Ok(ticket)) = (
                    http::StatusCode::from_bytes(part(0)),
                    http::HeaderValue::from_bytes(part(1)),
                    http::HeaderValue::from_bytes(part(2)),
                ) {
                    let mut h = http::HeaderMap::new();
                    h.insert(H_REASON, reason);
                    if !ticket.is_empty() {
                        h.insert(H_TICKET, ticket);
                    }
                    if let Ok(r) = Response::from_http(status, &h) {
                        let back = r.to_http();
                        assert_eq!(
                            Response::from_http(back.status(), back.headers()).unwrap(),
                            r
                        );
                    }
                }
                if let Some(p) = input.first_chunk::<PREFACE_LEN>() {
                    if let Ok(t) = Ticket::from_preface(p) {
                        assert_eq!(t.preface(), *p);
                    }
                    if let Ok(t) = Ticket::from_move_preface(p) {
                        assert_eq!(t.move_preface(), *p);
                    }
                }
                if let Some(p) = input.first_chunk::<BOOK_PREFACE_LEN>() {
                    if let Ok((t, port)) = Ticket::from_book_preface(p) {
                        assert_eq!(t.book_preface(port), *p);
                    }
                }
                if let Ok(v) = http::HeaderValue::from_bytes(input) {
                    let mut h = http::HeaderMap::new();
                    h.insert(H_REASON, http::HeaderValue::from_static("accepted"));
                    h.insert(H_TICKETS, v);
                    if let Ok(ts) = book_from_http(http::StatusCode::OK, &h) {
                        let back = book_answer(&ts);
                        assert_eq!(book_from_http(back.status(), back.headers()).unwrap(), ts);
                    }
                }
                let mut rest = input;
                while let Some(h) = rest.first_chunk::<2>() {
                    let Ok(n) = frame_len(*h) else { break };
                    let Some(body) = rest.get(2..2 + n) else {
                        break;
                    };
                    assert_eq!(frame(body)[2..], *body);
                    rest = &rest[2 + n..];
                }
            },
        );
    }

    #[test]
    fn requests_round_trip_and_lies_are_refused() {
        for r in [
            Request {
                port: 8080,
                encrypt: true,
                udp: false,
                movable: false,
            },
            Request {
                port: 53,
                encrypt: true,
                udp: true,
                movable: false,
            },
            Request {
                port: 1,
                encrypt: false,
                udp: false,
                movable: false,
            },
            Request {
                port: 5201,
                encrypt: false,
                udp: false,
                movable: true,
            },
        ] {
            let to = SocketAddr::from(([10, 1, 2, 3], r.port));
            assert_eq!(Request::from_http(&r.to_http(to)).unwrap(), r);
            let v6: SocketAddr = format!("[fd00::1]:{}", r.port).parse().unwrap();
            assert_eq!(Request::from_http(&r.to_http(v6)).unwrap(), r);
        }
        let bad = |b: http::request::Builder| Request::from_http(&b.body(()).unwrap()).unwrap_err();
        let connect = || http::Request::builder().method(http::Method::CONNECT);
        assert_eq!(bad(http::Request::builder().uri("/x")), WireError::Method);
        assert_eq!(bad(connect().uri("10.0.0.1:0")), WireError::Port);
        assert_eq!(bad(connect().uri("10.0.0.1")), WireError::Port);
        assert_eq!(
            bad(connect().uri("10.0.0.1:80").header(H_ENCRYPT, "yes")),
            WireError::Header(H_ENCRYPT)
        );
        assert_eq!(
            bad(connect().uri("10.0.0.1:80").header(H_PROTOCOL, "sctp")),
            WireError::Header(H_PROTOCOL)
        );
        for (name, v) in [(H_ENCRYPT, "1"), (H_PROTOCOL, "udp")] {
            let both = connect().uri("10.0.0.1:80").header(H_MOVABLE, "1");
            assert_eq!(
                bad(both.header(name, v)),
                WireError::Header(H_MOVABLE),
                "only an authenticated-only TCP flow moves ({name})"
            );
        }
    }

    #[test]
    fn answers_round_trip_and_are_checked() {
        let t = Ticket::random();
        assert_ne!(t, Ticket::random(), "random");
        let n = Ticket::random_n(3);
        assert!(n.len() == 3 && n[0] != n[1] && n[1] != n[2], "random");
        for r in [
            Response {
                reason: Reason::Accepted,
                ticket: Some(t),
                moves: None,
            },
            Response {
                reason: Reason::Accepted,
                ticket: None,
                moves: Some(t),
            },
            Response::refused(Reason::Accepted),
            Response::refused(Reason::Policy),
            Response::refused(Reason::Unreachable),
        ] {
            let h = r.to_http();
            assert_eq!(Response::from_http(h.status(), h.headers()).unwrap(), r);
        }
        let mut h = http::HeaderMap::new();
        h.insert(H_REASON, "policy".parse().unwrap());
        assert_eq!(
            Response::from_http(http::StatusCode::OK, &h).unwrap_err(),
            WireError::Status
        );
        h.insert(H_TICKET, t.to_hex().parse().unwrap());
        assert_eq!(
            Response::from_http(http::StatusCode::FORBIDDEN, &h).unwrap_err(),
            WireError::Header(H_TICKET),
            "no ticket with a refusal"
        );
        h.insert(H_REASON, "accepted".parse().unwrap());
        h.insert(H_MOVE, t.to_hex().parse().unwrap());
        assert_eq!(
            Response::from_http(http::StatusCode::OK, &h).unwrap_err(),
            WireError::Header(H_MOVE),
            "a flow moves or has a connection of its own, not both"
        );
        h.remove(H_MOVE);
        h.insert(H_TICKET, t.to_hex().to_uppercase().parse().unwrap());
        assert!(Response::from_http(http::StatusCode::OK, &h).is_err());
        let mut refused = http::HeaderMap::new();
        refused.insert(H_REASON, "policy".parse().unwrap());
        refused.insert(H_MOVE, t.to_hex().parse().unwrap());
        assert_eq!(
            Response::from_http(http::StatusCode::FORBIDDEN, &refused).unwrap_err(),
            WireError::Header(H_MOVE),
            "no move ticket with a refusal"
        );
        assert_eq!(Ticket::from_preface(&t.preface()).unwrap(), t);
        assert_eq!(Ticket::from_move_preface(&t.move_preface()).unwrap(), t);
        assert_eq!(
            Ticket::from_preface(&t.move_preface()).unwrap_err(),
            WireError::Preface,
            "a move ticket opens no flow of its own"
        );
        assert_eq!(
            Ticket::from_move_preface(&t.preface()).unwrap_err(),
            WireError::Preface
        );
        let mut p = t.preface();
        p[0] = 0x16;
        assert_eq!(Ticket::from_preface(&p).unwrap_err(), WireError::Preface);
        assert_eq!(format!("{t:?}"), "Ticket(..)");
    }

    #[test]
    fn tickets_are_written_as_lowercase_hex_and_read_back() {
        let t = Ticket(std::array::from_fn(|i| (i as u8) * 8 + 7));
        let hex = t.to_hex();
        assert_eq!(
            hex,
            "070f171f272f373f474f575f676f777f878f979fa7afb7bfc7cfd7dfe7eff7ff"
        );
        assert!(Ticket::from_hex(hex.as_bytes()).unwrap() == t);
    }

    #[test]
    fn books_round_trip_and_are_checked() {
        let ts: Vec<Ticket> = (0..3).map(|_| Ticket::random()).collect();
        let a = book_answer(&ts);
        assert_eq!(book_from_http(a.status(), a.headers()).unwrap(), ts);
        let none = book_answer(&[]);
        assert!(
            book_from_http(none.status(), none.headers())
                .unwrap()
                .is_empty()
        );
        let refused = Response::refused(Reason::Overload).to_http();
        assert!(book_from_http(refused.status(), refused.headers()).is_err());
        let mut h = a.headers().clone();
        h.insert(H_TICKETS, "ab".repeat(33).parse().unwrap());
        assert!(book_from_http(a.status(), &h).is_err(), "not whole tickets");
        h.insert(H_TICKETS, "ab".repeat(32 * (MAX_BOOK + 1)).parse().unwrap());
        assert!(book_from_http(a.status(), &h).is_err(), "too many");

        assert_eq!(book_count(&book_request(7)).unwrap(), Some(7));
        assert_eq!(book_count(&book_request(1000)).unwrap(), Some(MAX_BOOK));
        let target = SocketAddr::from(([10, 0, 0, 2], 80));
        let flow = Request {
            port: 80,
            encrypt: false,
            udp: false,
            movable: false,
        };
        assert_eq!(book_count(&flow.to_http(target)).unwrap(), None);
        let get = |uri: &str, n: &str| http::Request::get(uri).header(H_COUNT, n).body(()).unwrap();
        let book = "https://segmesh.tunnel/tickets";
        assert_eq!(book_count(&get(book, "0")), Err(WireError::Header(H_COUNT)));
        assert_eq!(
            book_count(&get(book, "65")),
            Err(WireError::Header(H_COUNT))
        );
        assert_eq!(book_count(&get(book, "x")), Err(WireError::Header(H_COUNT)));
        assert_eq!(
            book_count(&get("https://x/other", "1")),
            Err(WireError::Book)
        );

        let t = ts[0];
        assert_eq!(
            Ticket::from_book_preface(&t.book_preface(8080)).unwrap(),
            (t, 8080)
        );
        assert_eq!(
            Ticket::from_book_preface(&t.book_preface(0)).unwrap_err(),
            WireError::Port
        );
        let mut p = t.book_preface(80);
        p[3] = 0x02;
        assert_eq!(
            Ticket::from_book_preface(&p).unwrap_err(),
            WireError::Preface
        );
        for r in Reason::ALL.map(|(r, ..)| r) {
            assert_eq!(Reason::from_code(r.code()), Some(r));
        }
        assert_eq!(Reason::from_code(200), None);
    }

    #[test]
    fn frames() {
        assert_eq!(frame(b"abc"), vec![0, 3, b'a', b'b', b'c']);
        assert_eq!(frame_len([0, 3]).unwrap(), 3);
        assert!(frame_len([0xff, 0xff]).is_err());
        assert_eq!(frame(&vec![1u8; 70_000]).len(), 2 + MAX_DATAGRAM);
    }
}
