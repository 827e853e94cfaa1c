//! The mesh tunnel's wire format, spoken inside TLS 1.3 right after the handshake. No
//! I/O here: encoding, strict decoding and the reason codes.
//!
//! Request (client → server), 6 bytes then `ext_len` bytes of extensions:
//! `version u8 = 1 | flags u8 | target port u16 BE | ext_len u16 BE | ext`.
//! Flags: bit 0 = the client's decision wants encryption; bit 1 = a UDP session (the
//! target port is a UDP port; the data plane carries datagrams, see below). `ext_len`
//! may not exceed [`MAX_EXT`]; extensions are reserved (ignored).
//!
//! Response (server → client), 4 bytes:
//! `version u8 = 1 | status u8 (0 accept, 1 reject) | reason u8 | flags u8`.
//! Flags: bit 0 = the data plane stays encrypted (set when either end's decision wants
//! encryption: encrypted wins).
//!
//! UDP sessions stay inside TLS after an accept; each datagram travels as a frame:
//! `length u16 BE | payload` (at most [`MAX_DATAGRAM`] bytes, an empty datagram is a
//! frame of length 0).
//!
//! Nothing in either message says who the client is or what tags it has: those come only
//! from its certificate.

pub const VERSION: u8 = 1;
pub const MAX_EXT: usize = 256;
pub const REQUEST_LEN: usize = 6;
pub const RESPONSE_LEN: usize = 4;
/// The raw byte the server sends after both `close_notify`s in authenticated-only mode;
/// plaintext flows only after it (see [`crate::mesh`]).
pub const GO: u8 = 0x47;

const FLAG_ENCRYPT: u8 = 1;
const FLAG_UDP: u8 = 2;
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
    /// A UDP session (datagrams framed inside TLS).
    pub udp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    Accepted = 0,
    /// An enforced policy rejected it.
    Policy = 1,
    /// No enforced policy matched.
    Default = 2,
    /// The server has no valid configuration.
    NoSnapshot = 3,
    /// The request was malformed.
    BadRequest = 4,
    /// The server is at its connection limit.
    Overload = 5,
    /// The server could not reach its workload.
    Unreachable = 6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub accept: bool,
    pub reason: Reason,
    pub encrypt: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unsupported tunnel version {0}")]
    Version(u8),
    #[error("extensions of {0} bytes exceed the limit of {MAX_EXT}")]
    TooLong(usize),
    #[error("port 0")]
    Port,
    #[error("unknown status or reason ({0}, {1})")]
    Status(u8, u8),
}

impl Reason {
    fn from_u8(v: u8) -> Option<Reason> {
        Some(match v {
            0 => Reason::Accepted,
            1 => Reason::Policy,
            2 => Reason::Default,
            3 => Reason::NoSnapshot,
            4 => Reason::BadRequest,
            5 => Reason::Overload,
            6 => Reason::Unreachable,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Accepted => "accepted",
            Reason::Policy => "policy",
            Reason::Default => "default",
            Reason::NoSnapshot => "no-snapshot",
            Reason::BadRequest => "bad-request",
            Reason::Overload => "overload",
            Reason::Unreachable => "unreachable",
        }
    }
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let p = self.port.to_be_bytes();
        [
            VERSION,
            if self.encrypt { FLAG_ENCRYPT } else { 0 } | if self.udp { FLAG_UDP } else { 0 },
            p[0],
            p[1],
            0,
            0,
        ]
    }

    /// Decodes the fixed part; returns the request and how many extension bytes follow.
    pub fn decode(b: &[u8; REQUEST_LEN]) -> Result<(Request, usize), WireError> {
        if b[0] != VERSION {
            return Err(WireError::Version(b[0]));
        }
        let port = u16::from_be_bytes([b[2], b[3]]);
        if port == 0 {
            return Err(WireError::Port);
        }
        let ext = u16::from_be_bytes([b[4], b[5]]) as usize;
        if ext > MAX_EXT {
            return Err(WireError::TooLong(ext));
        }
        Ok((
            Request {
                port,
                encrypt: b[1] & FLAG_ENCRYPT != 0,
                udp: b[1] & FLAG_UDP != 0,
            },
            ext,
        ))
    }
}

impl Response {
    pub fn encode(&self) -> [u8; RESPONSE_LEN] {
        [
            VERSION,
            u8::from(!self.accept),
            self.reason as u8,
            if self.encrypt { FLAG_ENCRYPT } else { 0 },
        ]
    }

    pub fn decode(b: &[u8; RESPONSE_LEN]) -> Result<Response, WireError> {
        if b[0] != VERSION {
            return Err(WireError::Version(b[0]));
        }
        let reason = Reason::from_u8(b[2]).ok_or(WireError::Status(b[1], b[2]))?;
        let accept = match b[1] {
            0 => true,
            1 => false,
            _ => return Err(WireError::Status(b[1], b[2])),
        };
        if accept != (reason == Reason::Accepted) {
            return Err(WireError::Status(b[1], b[2]));
        }
        Ok(Response {
            accept,
            reason,
            encrypt: b[3] & FLAG_ENCRYPT != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    /// Fuzz target: the tunnel's header as a server reads it from a peer (request and
    /// its extension length, then datagram frames) and as a client reads the answer.
    /// Nothing panics; what decodes encodes back the same.
    #[test]
    fn fuzz_tunnel_header() {
        let seeds: Vec<Vec<u8>> = vec![
            Request {
                port: 8080,
                encrypt: true,
                udp: false,
            }
            .encode()
            .to_vec(),
            [
                Request {
                    port: 53,
                    encrypt: true,
                    udp: true,
                }
                .encode()
                .to_vec(),
                frame(b"query"),
                frame(b""),
            ]
            .concat(),
            Response {
                accept: true,
                reason: Reason::Accepted,
                encrypt: false,
            }
            .encode()
            .to_vec(),
            vec![VERSION, 0, 0x1f, 0x90, 0xff, 0xff],
        ];
        let refs: Vec<&[u8]> = seeds.iter().map(Vec::as_slice).collect();
        segmesh_testkit::fuzz::run(
            "tunnel-header",
            &refs,
            &[&[VERSION], &[0xff, 0xff]],
            |input| {
                if let Some(head) = input.first_chunk::<REQUEST_LEN>() {
                    if let Ok((req, ext)) = Request::decode(head) {
                        assert!(ext <= MAX_EXT);
                        if ext == 0 {
                            assert_eq!(Request::decode(&req.encode()).unwrap().0, req);
                        }
                        let mut rest = input.get(REQUEST_LEN + ext..).unwrap_or(&[]);
                        while let Some(h) = rest.first_chunk::<2>() {
                            let Ok(n) = frame_len(*h) else { break };
                            let Some(body) = rest.get(2..2 + n) else {
                                break;
                            };
                            assert_eq!(frame(body)[2..], *body);
                            rest = &rest[2 + n..];
                        }
                    }
                }
                if let Some(head) = input.first_chunk::<RESPONSE_LEN>() {
                    if let Ok(r) = Response::decode(head) {
                        assert_eq!(Response::decode(&r.encode()).unwrap(), r);
                    }
                }
            },
        );
    }

    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            udp: false,
            port: 8080,
            encrypt: true,
        };
        let b = r.encode();
        assert_eq!(b, [1, 1, 0x1f, 0x90, 0, 0]);
        assert_eq!(Request::decode(&b), Ok((r, 0)));
        assert_eq!(
            Request::decode(&[1, 0, 0, 80, 0, 200]),
            Ok((
                Request {
                    udp: false,
                    port: 80,
                    encrypt: false
                },
                200
            ))
        );
    }

    #[test]
    fn udp_requests_and_frames() {
        let r = Request {
            udp: true,
            port: 53,
            encrypt: true,
        };
        let b = r.encode();
        assert_eq!(b, [1, 3, 0, 53, 0, 0]);
        assert_eq!(Request::decode(&b), Ok((r, 0)));
        let f = frame(b"abc");
        assert_eq!(f, [0, 3, b'a', b'b', b'c']);
        assert_eq!(frame_len([f[0], f[1]]), Ok(3));
        assert_eq!(frame(b""), [0, 0]);
        assert_eq!(frame_len([0xff, 0xff]), Err(WireError::TooLong(65535)));
        assert_eq!(frame(&vec![7u8; 70_000]).len(), 2 + MAX_DATAGRAM);
    }

    #[test]
    fn request_rejects_lies_and_garbage() {
        assert_eq!(
            Request::decode(&[2, 0, 0, 80, 0, 0]),
            Err(WireError::Version(2))
        );
        assert_eq!(Request::decode(&[1, 0, 0, 0, 0, 0]), Err(WireError::Port));
        assert_eq!(
            Request::decode(&[1, 0, 0, 80, 0xff, 0xff]),
            Err(WireError::TooLong(65535))
        );
        assert_eq!(
            Request::decode(&[1, 0, 0, 80, 1, 1]),
            Err(WireError::TooLong(257))
        );
    }

    #[test]
    fn response_round_trip_and_checks() {
        for r in [
            Response {
                accept: true,
                reason: Reason::Accepted,
                encrypt: false,
            },
            Response {
                accept: false,
                reason: Reason::Policy,
                encrypt: true,
            },
            Response {
                accept: false,
                reason: Reason::Unreachable,
                encrypt: false,
            },
        ] {
            assert_eq!(Response::decode(&r.encode()), Ok(r));
        }
        assert!(
            Response::decode(&[1, 0, 1, 0]).is_err(),
            "accept with a reject reason"
        );
        assert!(
            Response::decode(&[1, 1, 0, 0]).is_err(),
            "reject with the accept reason"
        );
        assert!(Response::decode(&[1, 2, 1, 0]).is_err());
        assert!(Response::decode(&[1, 1, 99, 0]).is_err());
    }
}
