//! DNS over TCP from our PU (outbound port 53): relayed through a buffer rather than
//! spliced, so that the answers, length-prefixed messages (RFC 1035 §4.2.2), teach the
//! names of addresses like the answers of UDP sessions do.

use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::Notify;

use super::splice::{Close, DataPath, Outcome};
use crate::dns::Names;

/// The largest message a TCP DNS stream carries (the length prefix is 16 bits).
const MAX_MESSAGE: usize = 65_535;

/// Splits complete messages off the front of `stream`, handing each to `each`.
fn messages(stream: &mut Vec<u8>, mut each: impl FnMut(&[u8])) {
    while stream.len() >= 2 {
        let n = u16::from_be_bytes([stream[0], stream[1]]) as usize;
        if stream.len() < 2 + n {
            break;
        }
        each(&stream[2..2 + n]);
        stream.drain(..2 + n);
    }
}

/// Bytes read per readiness, in a buffer taken for that read.
const READ: usize = 16 << 10;

/// What `r` has now, in a buffer of its own (`None` at the end of the stream): a
/// direction holds no buffer while it waits. Before, each DNS connection kept 24 KiB
/// (a 16 KiB buffer and `tokio::io::copy`'s 8 KiB) for as long as it was open.
async fn read_some(r: &OwnedReadHalf) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        r.readable().await?;
        let mut buf = vec![0u8; READ];
        match r.try_read(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Relays `app` ↔ `upstream` (a resolver), learning from every answer, until both
/// directions end, `stop` is notified, or `limit` passes.
pub(crate) async fn relay(
    app: TcpStream,
    upstream: TcpStream,
    limit: Duration,
    stop: &Notify,
    names: &Names,
) -> Outcome {
    let (ar, mut aw) = app.into_split();
    let (ur, mut uw) = upstream.into_split();
    let queries = async {
        let mut total = 0u64;
        while let Some(b) = read_some(&ar).await? {
            uw.write_all(&b).await?;
            total += b.len() as u64;
        }
        uw.shutdown().await?;
        Ok::<u64, std::io::Error>(total)
    };
    let answers = async {
        let mut pending = Vec::new();
        let mut total = 0u64;
        while let Some(b) = read_some(&ur).await? {
            aw.write_all(&b).await?;
            total += b.len() as u64;
            pending.extend_from_slice(&b);
            messages(&mut pending, |m| {
                names.learn(m, Instant::now());
            });
            if pending.is_empty() || pending.len() > 2 + MAX_MESSAGE {
                // Nothing partial (or not DNS after all: stop looking, keep relaying):
                // an idle connection keeps no buffer.
                pending = Vec::new();
            }
        }
        aw.shutdown().await?;
        Ok::<u64, std::io::Error>(total)
    };
    let (forward, backward, close) = tokio::select! {
        r = async { tokio::join!(queries, answers) } => match r {
            (Ok(f), Ok(b)) => (f, b, Close::Closed),
            _ => (0, 0, Close::Reset),
        },
        _ = stop.notified() => (0, 0, Close::Policy),
        _ = tokio::time::sleep(limit) => (0, 0, Close::Idle),
    };
    Outcome {
        forward,
        backward,
        path: DataPath::Inspected,
        close,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_split_on_their_length_prefix() {
        let mut s = vec![0, 3, b'a', b'b', b'c', 0, 2, b'x'];
        let mut got = Vec::new();
        messages(&mut s, |m| got.push(m.to_vec()));
        assert_eq!(got, vec![b"abc".to_vec()]);
        // The second message waits for its last byte.
        assert_eq!(s, vec![0, 2, b'x']);
        s.push(b'y');
        messages(&mut s, |m| got.push(m.to_vec()));
        assert_eq!(got[1], b"xy");
        assert!(s.is_empty());
    }
}
