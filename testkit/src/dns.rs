//! DNS messages for the tests, the demo and the load harness: a query for a name, the
//! answer a test resolver gives, and the addresses in an answer (hickory-proto for the
//! wire format).

use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// An A query for `name` with message id `id`; `None` if `name` is no domain name.
pub fn query(id: u16, name: &str) -> Option<Vec<u8>> {
    let mut q = Message::new(id, MessageType::Query, OpCode::Query);
    q.add_query(Query::query(Name::from_ascii(name).ok()?, RecordType::A));
    q.to_vec().ok()
}

/// The answer to a query: an A record to `ip` (TTL `ttl`) for each asked name that
/// `known` accepts, NXDOMAIN otherwise; `None` if `query` is not a DNS message.
pub fn answer(
    query: &[u8],
    known: impl Fn(&str) -> bool,
    ip: Ipv4Addr,
    ttl: u32,
) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::response(q.metadata.id, q.metadata.op_code);
    r.add_queries(q.queries.clone());
    for query in &q.queries {
        if known(query.name().to_ascii().trim_end_matches('.')) {
            r.add_answer(Record::from_rdata(
                query.name().clone(),
                ttl,
                RData::A(A(ip)),
            ));
        } else {
            r.metadata.response_code = ResponseCode::NXDomain;
        }
    }
    r.to_vec().ok()
}

/// The A addresses of an answer (none if it is no DNS message).
pub fn addresses(answer: &[u8]) -> Vec<IpAddr> {
    Message::from_vec(answer)
        .map(|m| {
            m.answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_gets_its_answer() {
        let q = query(9, "a.example.test.").unwrap();
        let ip = Ipv4Addr::new(192, 0, 2, 7);
        let a = answer(&q, |n| n == "a.example.test", ip, 60).unwrap();
        assert_eq!(addresses(&a), vec![IpAddr::V4(ip)]);
        let other = query(10, "b.example.test.").unwrap();
        let none = answer(&other, |n| n == "a.example.test", ip, 60).unwrap();
        assert!(addresses(&none).is_empty());
        assert!(answer(b"junk", |_| true, ip, 60).is_none());
    }
}
