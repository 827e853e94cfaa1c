//! The main job keeps working: `segmesh-demo` runs to the end, shows the verdicts the
//! three-tier example implies, and leaves nothing behind; a second run right after
//! works too.

use std::process::Command;

fn run_demo() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_segmesh-demo"))
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

fn row<'a>(text: &'a str, from: &str, to: &str, port: u16) -> Vec<&'a str> {
    text.lines()
        .filter(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() > 3 && w[0] == from && w[1] == to && w[2] == port.to_string()
        })
        .collect()
}

#[test]
fn netns_demo_runs_twice_and_cleans_up() {
    if !segmesh_testkit::netns_enabled() {
        return;
    }
    for _ in 0..2 {
        let text = run_demo();
        let first = |from, to, port| row(&text, from, to, port)[0];
        assert!(first("internet", "web", 443).contains("allow"), "{text}");
        assert!(first("web", "api", 8080).contains("web-to-api"), "{text}");
        assert!(first("web", "api", 8080).contains("encrypted"), "{text}");
        assert!(
            first("web", "api", 8089).contains("api-debug-port-closed"),
            "{text}"
        );
        assert!(first("web", "db", 5432).contains("reject"), "{text}");
        assert!(first("admin", "db", 22).contains("admin-ssh"), "{text}");
        // Discovery, then the suggested policies: the same flow, now by policy.
        let lab = row(&text, "lab-client", "lab-store", 6379);
        assert!(lab[0].contains("discovery"), "{text}");
        assert!(lab[1].contains("allow-lab-client-to-lab-store"), "{text}");
        assert!(
            row(&text, "lab-client", "lab-store", 22)[0].contains("reject"),
            "{text}"
        );
        // DNS and a domain: refused until lab-client resolved a covered name.
        let domain = row(&text, "lab-client", "internet", 8443);
        assert!(domain[0].contains("reject"), "{text}");
        assert!(domain[1].contains("reject"), "{text}");
        assert!(domain[2].contains("lab-to-example-test"), "{text}");
        assert!(
            text.contains("destination.domain \"shop.example.test\""),
            "{text}"
        );
        // The quarantine.
        assert!(text.contains("the open session was closed"), "{text}");
        let after = row(&text, "web", "api", 8080);
        assert!(after.last().unwrap().contains("quarantine-api"), "{text}");
        assert!(text.contains("close_reason \"policy\""), "{text}");
        // UDP and ICMP, both families, to a PU and the internet: nothing through.
        assert!(
            text.contains("UDP and ping from api, IPv4 and IPv6"),
            "{text}"
        );
        assert!(
            text.contains("ping attempts are recorded with quarantine-api"),
            "{text}"
        );
        let left: Vec<String> = std::fs::read_dir("/var/run/netns")
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.contains("-lab-store") || n.contains("-console"))
                    .filter(|n| {
                        // Only namespaces of demo processes, which are gone by now.
                        n.split('-')
                            .nth(1)
                            .and_then(|p| p.parse::<u32>().ok())
                            .is_some_and(|p| p != std::process::id())
                    })
                    .collect()
            })
            .unwrap_or_default();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
