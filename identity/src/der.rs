//! A minimal DER tree (X.690 §8.1: tag, definite length, content) used for one job:
//! replacing the placeholder OID of the tags extension with the project's real OID and
//! re-signing. rcgen (through yasna) limits OID arcs to 64 bits, and the `2.25` arc of a
//! UUID (ITU-T X.667) needs 128.

use crate::IdentityError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Node {
    Primitive { tag: u8, content: Vec<u8> },
    Constructed { tag: u8, children: Vec<Node> },
}

fn bad(what: &'static str) -> IdentityError {
    IdentityError::BadCertificate(format!("DER: {what}"))
}

fn read_len(b: &[u8]) -> Result<(usize, &[u8]), IdentityError> {
    let (&first, rest) = b.split_first().ok_or_else(|| bad("truncated length"))?;
    if first < 0x80 {
        return Ok((first as usize, rest));
    }
    let n = (first & 0x7f) as usize;
    if n == 0 || n > 4 || rest.len() < n {
        return Err(bad("unsupported length"));
    }
    let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
    Ok((len, &rest[n..]))
}

pub(crate) fn write_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Parses one element; returns it and what follows.
pub(crate) fn parse(b: &[u8]) -> Result<(Node, &[u8]), IdentityError> {
    let (&tag, rest) = b.split_first().ok_or_else(|| bad("truncated tag"))?;
    if tag & 0x1f == 0x1f {
        return Err(bad("high tag numbers are not used in certificates"));
    }
    let (len, rest) = read_len(rest)?;
    if rest.len() < len {
        return Err(bad("truncated content"));
    }
    let (content, after) = rest.split_at(len);
    let node = if tag & 0x20 != 0 {
        let mut children = Vec::new();
        let mut c = content;
        while !c.is_empty() {
            let (child, r) = parse(c)?;
            children.push(child);
            c = r;
        }
        Node::Constructed { tag, children }
    } else {
        Node::Primitive {
            tag,
            content: content.to_vec(),
        }
    };
    Ok((node, after))
}

pub(crate) fn encode(node: &Node, out: &mut Vec<u8>) {
    match node {
        Node::Primitive { tag, content } => {
            out.push(*tag);
            write_len(out, content.len());
            out.extend_from_slice(content);
        }
        Node::Constructed { tag, children } => {
            let mut body = Vec::new();
            for c in children {
                encode(c, &mut body);
            }
            out.push(*tag);
            write_len(out, body.len());
            out.extend(body);
        }
    }
}

/// Replaces every primitive whose tag and content match; returns how many.
pub(crate) fn replace(node: &mut Node, tag: u8, from: &[u8], to: &[u8]) -> usize {
    match node {
        Node::Primitive { tag: t, content } if *t == tag && content == from => {
            *content = to.to_vec();
            1
        }
        Node::Primitive { .. } => 0,
        Node::Constructed { children, .. } => {
            children.iter_mut().map(|c| replace(c, tag, from, to)).sum()
        }
    }
}

/// The content octets of an OID `2.25.<arc>` (X.690 §8.19: first two arcs as 40·2+25,
/// then each arc in base 128, high bit set on all but the last byte).
pub(crate) fn oid_2_25(arc: u128) -> Vec<u8> {
    let mut groups = vec![(arc & 0x7f) as u8];
    let mut n = arc >> 7;
    while n > 0 {
        groups.push(0x80 | (n & 0x7f) as u8);
        n >>= 7;
    }
    groups.reverse();
    let mut out = vec![2 * 40 + 25];
    out.extend(groups);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let der = b"\x30\x0a\x06\x03\x2a\x03\x04\xa0\x03\x02\x01\x05";
        let (n, rest) = parse(der).unwrap();
        assert!(rest.is_empty());
        let mut out = Vec::new();
        encode(&n, &mut out);
        assert_eq!(out, der);
    }

    #[test]
    fn replace_recomputes_lengths() {
        let (mut n, _) = parse(b"\x30\x08\x30\x06\x06\x01\x2a\x01\x01\xff").unwrap();
        assert_eq!(replace(&mut n, 0x06, b"\x2a", &[0x2b; 200]), 1);
        let mut out = Vec::new();
        encode(&n, &mut out);
        assert_eq!(&out[..3], &[0x30, 0x81, 0xd1]);
        assert_eq!(&out[3..6], &[0x30, 0x81, 0xce]);
        assert_eq!(parse(&out).unwrap().0, n);
    }

    #[test]
    fn oid_encoding() {
        // 2.25.329800735698586629295641978511506172918 from ITU-T X.667's example.
        let got = oid_2_25(329_800_735_698_586_629_295_641_978_511_506_172_918);
        assert_eq!(got[0], 0x69);
        assert_eq!(got.len(), 1 + 19);
        assert!(got[1..got.len() - 1].iter().all(|b| b & 0x80 != 0));
        assert!(got[got.len() - 1] & 0x80 == 0);
        assert_eq!(oid_2_25(0x81), vec![0x69, 0x81, 0x01]);
    }
}
