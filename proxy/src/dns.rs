//! The names our PU resolved, learned from the answers to its own DNS queries (UDP
//! sessions to port 53 through the enforcer): A and AAAA records, with every name of
//! the CNAME chain that led to them, for the answer's TTL (the shortest TTL on the
//! chain). A connection to such an address then matches external networks whose domain
//! entries cover one of the names (DESIGN: domain names). Names are learned only from
//! this workload's own queries (the enforcer serves one PU), so no other workload can
//! poison them. Bounded: when full, expired entries go first, then those expiring
//! soonest.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::RData;

/// Address-name pairs kept at most.
pub(crate) const MAX_NAMES: usize = 16_384;

#[derive(Default)]
pub(crate) struct Names {
    by_ip: Mutex<HashMap<IpAddr, Vec<(String, Instant)>>>,
}

fn normal(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Names {
    /// Learns from one DNS response; returns how many address-name pairs it gave.
    /// Anything that is not a well-formed response teaches nothing.
    pub(crate) fn learn(&self, datagram: &[u8], now: Instant) -> usize {
        let Ok(m) = Message::from_vec(datagram) else {
            return 0;
        };
        if m.metadata.message_type != MessageType::Response {
            return 0;
        }
        // alias -> (canonical name, ttl): to walk each address's owner back up its chain.
        let mut alias_of: HashMap<String, Vec<(String, u32)>> = HashMap::new();
        let mut addrs: Vec<(IpAddr, String, u32)> = Vec::new();
        for r in &m.answers {
            let owner = normal(&r.name.to_ascii());
            match &r.data {
                RData::A(a) => addrs.push((IpAddr::V4(a.0), owner, r.ttl)),
                RData::AAAA(a) => addrs.push((IpAddr::V6(a.0), owner, r.ttl)),
                RData::CNAME(c) => alias_of
                    .entry(normal(&c.0.to_ascii()))
                    .or_default()
                    .push((owner, r.ttl)),
                _ => {}
            }
        }
        let mut learned = 0;
        let mut table = self.by_ip.lock().expect("lock poisoned");
        for (ip, owner, ttl) in addrs {
            // The owner and every alias leading to it (bounded walk: a chain longer
            // than 16 or a loop stops).
            let mut names = vec![(owner.clone(), ttl)];
            let mut i = 0;
            while i < names.len() && names.len() < 16 {
                let (n, t) = names[i].clone();
                for (alias, at) in alias_of.get(&n).into_iter().flatten() {
                    if !names.iter().any(|(x, _)| x == alias) {
                        names.push((alias.clone(), t.min(*at)));
                    }
                }
                i += 1;
            }
            for (name, ttl) in names {
                if ttl == 0 {
                    continue;
                }
                let until = now + Duration::from_secs(u64::from(ttl));
                let entry = table.entry(ip.to_canonical()).or_default();
                match entry.iter_mut().find(|(n, _)| *n == name) {
                    Some(e) => e.1 = e.1.max(until),
                    None => entry.push((name, until)),
                }
                learned += 1;
            }
        }
        Self::bound(&mut table, now);
        learned
    }

    fn bound(table: &mut HashMap<IpAddr, Vec<(String, Instant)>>, now: Instant) {
        let count =
            |t: &HashMap<IpAddr, Vec<(String, Instant)>>| t.values().map(Vec::len).sum::<usize>();
        if count(table) <= MAX_NAMES {
            return;
        }
        for v in table.values_mut() {
            v.retain(|(_, until)| *until > now);
        }
        table.retain(|_, v| !v.is_empty());
        while count(table) > MAX_NAMES {
            let Some((ip, i)) = table
                .iter()
                .flat_map(|(ip, v)| v.iter().enumerate().map(move |(i, (_, u))| (*ip, i, *u)))
                .min_by_key(|(_, _, u)| *u)
                .map(|(ip, i, _)| (ip, i))
            else {
                break;
            };
            let v = table.get_mut(&ip).expect("found above");
            v.remove(i);
            if v.is_empty() {
                table.remove(&ip);
            }
        }
    }

    /// The names our PU resolved to `ip`, still within their TTL.
    pub(crate) fn names(&self, ip: IpAddr, now: Instant) -> Vec<String> {
        let table = self.by_ip.lock().expect("lock poisoned");
        let mut out: Vec<String> = table
            .get(&ip.to_canonical())
            .into_iter()
            .flatten()
            .filter(|(_, until)| *until > now)
            .map(|(n, _)| n.clone())
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{OpCode, Query};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, Record, RecordType};

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn answer(records: Vec<Record>) -> Vec<u8> {
        let mut m = Message::response(7, OpCode::Query);
        m.add_query(Query::query(name("www.example.test."), RecordType::A));
        m.add_answers(records);
        m.to_vec().unwrap()
    }

    #[test]
    fn learns_addresses_with_their_cname_chain_for_the_ttl() {
        let names = Names::default();
        let t0 = Instant::now();
        let msg = answer(vec![
            Record::from_rdata(
                name("www.example.test."),
                300,
                RData::CNAME(CNAME(name("edge.cdn.test."))),
            ),
            Record::from_rdata(
                name("edge.cdn.test."),
                30,
                RData::A(A("192.0.2.7".parse().unwrap())),
            ),
            Record::from_rdata(
                name("edge.cdn.test."),
                60,
                RData::AAAA(AAAA("2001:db8::7".parse().unwrap())),
            ),
        ]);
        assert_eq!(names.learn(&msg, t0), 4);
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(names.names(v4, t0), ["edge.cdn.test", "www.example.test"]);
        // A v4-mapped address is the same address.
        assert_eq!(
            names.names("::ffff:192.0.2.7".parse().unwrap(), t0).len(),
            2
        );
        // The alias lives as long as the shortest TTL on its chain.
        assert!(names.names(v4, t0 + Duration::from_secs(31)).is_empty());
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        assert_eq!(names.names(v6, t0 + Duration::from_secs(59)).len(), 2);
        assert!(names.names(v6, t0 + Duration::from_secs(61)).is_empty());
    }

    #[test]
    fn queries_garbage_and_zero_ttls_teach_nothing() {
        let names = Names::default();
        let now = Instant::now();
        let mut q = Message::new(1, MessageType::Query, OpCode::Query);
        q.add_answer(Record::from_rdata(
            name("a.test."),
            60,
            RData::A(A("192.0.2.1".parse().unwrap())),
        ));
        assert_eq!(names.learn(&q.to_vec().unwrap(), now), 0);
        assert_eq!(names.learn(b"\x00\x01garbage", now), 0);
        assert_eq!(names.learn(&[], now), 0);
        let zero = answer(vec![Record::from_rdata(
            name("a.test."),
            0,
            RData::A(A("192.0.2.1".parse().unwrap())),
        )]);
        assert_eq!(names.learn(&zero, now), 0);
        assert!(names.names("192.0.2.1".parse().unwrap(), now).is_empty());
    }

    #[test]
    fn a_cname_loop_ends() {
        let names = Names::default();
        let now = Instant::now();
        let msg = answer(vec![
            Record::from_rdata(name("a.test."), 60, RData::CNAME(CNAME(name("b.test.")))),
            Record::from_rdata(name("b.test."), 60, RData::CNAME(CNAME(name("a.test.")))),
            Record::from_rdata(
                name("b.test."),
                60,
                RData::A(A("192.0.2.9".parse().unwrap())),
            ),
        ]);
        assert_eq!(names.learn(&msg, now), 2);
    }

    #[test]
    fn the_table_is_bounded() {
        let names = Names::default();
        let now = Instant::now();
        for i in 0..(MAX_NAMES + 100) {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i as u32);
            let msg = answer(vec![Record::from_rdata(
                name(&format!("n{i}.test.")),
                60 + (i as u32 % 7),
                RData::A(A(ip)),
            )]);
            names.learn(&msg, now);
        }
        let total: usize = names.by_ip.lock().unwrap().values().map(Vec::len).sum();
        assert_eq!(total, MAX_NAMES);
    }
}
