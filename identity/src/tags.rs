//! The tags extension: a non-critical X.509 extension under the project's private OID
//! whose value is a DER `SEQUENCE OF UTF8String`, sorted and deduplicated (X.690 §8.9,
//! §8.23.10; lengths in definite form, §8.1.3).

use crate::IdentityError;

/// The UUID arc of the project's private OID for the tags extension,
/// `2.25.<UUID as a decimal integer>` (ITU-T X.667 §6.3), generated once.
pub const TAGS_OID_UUID: u128 = 163_311_771_432_191_581_901_065_904_493_542_588_047;
/// The OID in dotted form.
pub const TAGS_OID_STR: &str = "2.25.163311771432191581901065904493542588047";

/// The DER content octets of the tags OID (what x509-parser's `Oid::as_bytes` returns).
pub fn oid_der() -> Vec<u8> {
    crate::der::oid_2_25(TAGS_OID_UUID)
}

/// At most this many tags, and this many bytes of tag text, in one certificate.
pub const MAX_TAGS: usize = 256;
pub const MAX_TAG_BYTES: usize = 32 * 1024;

const SEQUENCE: u8 = 0x30;
const UTF8_STRING: u8 = 0x0c;

fn push_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// Sorted, deduplicated, checked tags (`key=value`, no control characters).
pub fn normalize(tags: &[String]) -> Result<Vec<String>, IdentityError> {
    let mut v: Vec<String> = tags.to_vec();
    v.sort();
    v.dedup();
    for t in &v {
        let ok = t
            .split_once('=')
            .is_some_and(|(k, val)| !k.is_empty() && !val.is_empty())
            && !t.chars().any(char::is_control);
        if !ok {
            return Err(IdentityError::BadTag(t.clone()));
        }
    }
    let bytes: usize = v.iter().map(String::len).sum();
    if v.len() > MAX_TAGS || bytes > MAX_TAG_BYTES {
        return Err(IdentityError::TooManyTags(v.len(), bytes));
    }
    Ok(v)
}

/// DER of the extension value.
pub fn encode(tags: &[String]) -> Result<Vec<u8>, IdentityError> {
    let tags = normalize(tags)?;
    let mut body = Vec::new();
    for t in &tags {
        body.push(UTF8_STRING);
        push_len(&mut body, t.len());
        body.extend_from_slice(t.as_bytes());
    }
    let mut out = vec![SEQUENCE];
    push_len(&mut out, body.len());
    out.extend(body);
    Ok(out)
}

/// Reads one definite-form DER length; rejects non-minimal encodings (X.690 §10.1).
fn read_len(b: &[u8]) -> Result<(usize, &[u8]), IdentityError> {
    let bad = IdentityError::MalformedTags("bad length");
    let (&first, rest) = b
        .split_first()
        .ok_or(IdentityError::MalformedTags("truncated"))?;
    if first < 0x80 {
        return Ok((first as usize, rest));
    }
    let n = (first & 0x7f) as usize;
    if n == 0 || n > 4 || rest.len() < n || rest[0] == 0 {
        return Err(bad);
    }
    let len = rest[..n].iter().fold(0usize, |a, &x| (a << 8) | x as usize);
    if len < 0x80 {
        return Err(bad);
    }
    Ok((len, &rest[n..]))
}

fn read_tlv(b: &[u8], tag: u8) -> Result<(&[u8], &[u8]), IdentityError> {
    match b.first() {
        Some(&t) if t == tag => {}
        Some(_) => return Err(IdentityError::MalformedTags("unexpected element")),
        None => return Err(IdentityError::MalformedTags("truncated")),
    }
    let (len, rest) = read_len(&b[1..])?;
    if rest.len() < len {
        return Err(IdentityError::MalformedTags("truncated"));
    }
    Ok(rest.split_at(len))
}

/// Parses the extension value strictly: one SEQUENCE of UTF8Strings, nothing after it,
/// each valid UTF-8 `key=value`, sorted and without duplicates (so one set of tags has
/// exactly one encoding).
pub fn decode(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    let (mut body, rest) = read_tlv(der, SEQUENCE)?;
    if !rest.is_empty() {
        return Err(IdentityError::MalformedTags("trailing bytes"));
    }
    let mut out: Vec<String> = Vec::new();
    while !body.is_empty() {
        let (s, rest) = read_tlv(body, UTF8_STRING)?;
        let s =
            std::str::from_utf8(s).map_err(|_| IdentityError::MalformedTags("invalid UTF-8"))?;
        if out.last().is_some_and(|prev| prev.as_str() >= s) {
            return Err(IdentityError::MalformedTags("not sorted or duplicated"));
        }
        out.push(s.to_owned());
        body = rest;
    }
    normalize(&out).map_err(|_| IdentityError::MalformedTags("a tag is not key=value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn round_trip_sorted_dedup() {
        let der = encode(&s(&["b=2", "a=1", "b=2"])).unwrap();
        assert_eq!(der, b"\x30\x0a\x0c\x03a=1\x0c\x03b=2");
        assert_eq!(decode(&der).unwrap(), s(&["a=1", "b=2"]));
        let long = "k=".to_owned() + &"v".repeat(300);
        let der = encode(std::slice::from_ref(&long)).unwrap();
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x32]);
        assert_eq!(decode(&der).unwrap(), vec![long]);
        assert_eq!(decode(&encode(&[]).unwrap()).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b""[..],
            b"\x31\x00",
            b"\x30\x06\x0c\x03a=1",
            b"\x30\x05\x0c\x03a=1\x00\x00",
            b"\x30\x05\x04\x03a=1",
            b"\x30\x0a\x0c\x03b=2\x0c\x03a=1",
            b"\x30\x0a\x0c\x03a=1\x0c\x03a=1",
            b"\x30\x05\x0c\x03abc",
            b"\x30\x05\x0c\x03a=\xff",
            b"\x30\x81\x05\x0c\x03a=1",
        ] {
            assert!(
                matches!(decode(bad), Err(IdentityError::MalformedTags(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            encode(&s(&["nokey"])),
            Err(IdentityError::BadTag(_))
        ));
    }
}
