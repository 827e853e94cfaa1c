//! Services: virtual addresses and ports in front of a set of endpoints, the way a
//! Kubernetes Service is. A connection to a Service's address and port goes to one of
//! its endpoints at the target port; endpoints are the registered PUs whose
//! certificates carry every tag of the selector (in the Service's namespace or below),
//! or addresses listed in the document (a registered PU's address is that PU; any other
//! is outside the mesh). A Service decides nothing: the flow to the chosen endpoint is
//! decided like any other.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::namespace::NamespacePath;
use crate::ports::Protocol;
use crate::tag::TagSet;

/// Bounds a Service document may not exceed (validation says which).
pub const MAX_ADDRESSES: usize = 16;
pub const MAX_PORTS: usize = 256;
pub const MAX_SELECTOR_TAGS: usize = 32;
pub const MAX_ENDPOINTS: usize = 4096;

/// One port of a Service: connections to `port` go to the endpoint's `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    pub protocol: Protocol,
    pub port: u16,
    pub target: u16,
}

/// Where a Service's endpoints come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoints {
    /// Registered PUs (in the Service's namespace or below) whose certificates carry
    /// every one of these tags.
    Selector(TagSet),
    /// These addresses.
    Addresses(Vec<IpAddr>),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub namespace: NamespacePath,
    /// The virtual addresses (v4 and v6) clients connect to.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Endpoints,
}

impl Service {
    /// `<namespace>:<name>`.
    pub fn qualified_name(&self) -> String {
        format!("{}:{}", self.namespace, self.name)
    }

    /// Whether a PU in `namespace` certified with `tags` is an endpoint (selector
    /// Services only).
    pub fn selects(&self, namespace: &NamespacePath, tags: &TagSet) -> bool {
        match &self.endpoints {
            Endpoints::Selector(want) => {
                self.namespace.is_ancestor_or_self(namespace)
                    && want.iter().all(|t| tags.contains(t))
            }
            Endpoints::Addresses(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_selector_stays_in_its_namespace() {
        let s = Service {
            name: "api".into(),
            namespace: "/acme/shop".parse().unwrap(),
            addresses: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                protocol: Protocol::Tcp,
                port: 80,
                target: 8080,
            }],
            endpoints: Endpoints::Selector(["app=api".parse().unwrap()].into_iter().collect()),
        };
        let tags: TagSet = ["app=api".parse().unwrap(), "env=prod".parse().unwrap()]
            .into_iter()
            .collect();
        assert!(s.selects(&"/acme/shop".parse().unwrap(), &tags));
        assert!(s.selects(&"/acme/shop/eu".parse().unwrap(), &tags));
        assert!(!s.selects(&"/acme/lab".parse().unwrap(), &tags));
        let other: TagSet = ["app=web".parse().unwrap()].into_iter().collect();
        assert!(!s.selects(&"/acme/shop".parse().unwrap(), &other));
        assert_eq!(s.qualified_name(), "/acme/shop:api");
    }

    fn load(text: &str) -> Result<Vec<Service>, Vec<String>> {
        crate::load(&[crate::Source {
            name: "s.yaml",
            text,
        }])
        .map(|l| l.services)
        .map_err(|e| {
            e.diagnostics
                .into_iter()
                .map(|d| format!("{}: {}", d.location.line, d.message))
                .collect()
        })
    }

    #[test]
    fn documents_load_with_defaults_and_precise_errors() {
        let ok = load(
            "kind: Service\nname: api\nnamespace: /acme\naddresses: [10.96.0.10, 'fd00:96::10']\n\
             ports: [{port: 80, targetPort: 8080}, {port: 53, protocol: udp}]\nselector: [app=api]\n---\n\
             kind: Service\nname: db\nnamespace: /acme\naddresses: [10.96.0.11]\nports: [{port: 5432}]\n\
             endpoints: [10.0.0.7, 10.0.0.8]\n",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(
            ok[0].ports,
            vec![
                ServicePort {
                    protocol: Protocol::Tcp,
                    port: 80,
                    target: 8080
                },
                ServicePort {
                    protocol: Protocol::Udp,
                    port: 53,
                    target: 53
                }
            ]
        );
        assert_eq!(
            ok[1].endpoints,
            Endpoints::Addresses(vec![
                "10.0.0.7".parse().unwrap(),
                "10.0.0.8".parse().unwrap()
            ])
        );
        let cases = [
            (
                "kind: Service\nname: a\naddresses: [10.96.0.1]\nports: [{port: 80}]\n",
                "either `selector`",
            ),
            (
                "kind: Service\nname: a\naddresses: [10.96.0.1]\nports: [{port: 0}]\nselector: [a=b]\n",
                "expected a port (1 to 65535), found `0`",
            ),
            (
                "kind: Service\nname: a\naddresses: [nope]\nports: [{port: 80}]\nselector: [a=b]\n",
                "`nope` is not an IP address",
            ),
            (
                "kind: Service\nname: a\naddresses: [10.96.0.1]\nports: [{port: 80}, {port: 80}]\nselector: [a=b]\n",
                "tcp/80 is listed twice",
            ),
            (
                "kind: Service\nname: a\naddresses: [10.96.0.1]\nports: [{port: 80, protocol: sctp}]\nselector: [a=b]\n",
                "expected one of tcp, udp",
            ),
            (
                "kind: Service\nname: a\naddresses: [10.96.0.1]\nports: [{port: 80}]\nselector: [a=b]\n---\n\
                 kind: Service\nname: b\naddresses: [10.96.0.1]\nports: [{port: 80}]\nselector: [a=b]\n",
                "10.96.0.1 tcp/80 already belongs to Service /:a",
            ),
            (
                "kind: Service\nname: a\naddresses: []\nports: [{port: 80}]\nselector: [a=b]\n",
                "expected 1 to 16 addresses, found 0",
            ),
        ];
        for (text, want) in cases {
            let errs = load(text).unwrap_err();
            assert!(errs.iter().any(|e| e.contains(want)), "{want}: {errs:?}");
        }
    }
}
