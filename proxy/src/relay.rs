//! The byte movers of allowed flows: [`splice`] (zero-copy between two TCP sockets,
//! with a copy fallback), [`tls`] (through the tunnel's TLS in user space) and
//! [`datagrams`] (UDP sessions framed inside the tunnel's TLS).

pub(crate) mod datagrams;
pub(crate) mod dns;
pub mod sockmap;
pub mod splice;
pub(crate) mod tls;

use splice::{Close, DataPath, Outcome};

/// What a finished flow moved, from the source's side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Moved {
    /// Bytes from the flow's source to its destination, and back.
    pub forward: u64,
    pub backward: u64,
    pub path: DataPath,
    pub close: Close,
    /// Encrypted through TLS (else spliced or copied plaintext).
    pub tls: bool,
    /// Of a flow that could move: its bytes that went through TLS, in its stream
    /// (before the move, if it moved; counted apart only for a moved one, `tls` false).
    pub in_tls: u64,
}

impl Moved {
    /// Nothing moved: the relay never started.
    pub(crate) fn nothing(close: Close, tls: bool) -> Moved {
        Moved {
            forward: 0,
            backward: 0,
            path: DataPath::Copied,
            close,
            tls,
            in_tls: 0,
        }
    }

    /// What a plaintext relay moved.
    pub(crate) fn plain(o: Outcome) -> Moved {
        Moved {
            forward: o.forward,
            backward: o.backward,
            path: o.path,
            close: o.close,
            tls: false,
            in_tls: 0,
        }
    }

    /// The same flow seen from the other end (the tunnel server relays tunnel → workload,
    /// i.e. destination → source first).
    pub(crate) fn reversed(self) -> Moved {
        Moved {
            forward: self.backward,
            backward: self.forward,
            ..self
        }
    }
}
