//! Applying, checking and removing the rules on the live system, with `iptables-save`,
//! `iptables-restore --noflush` (one atomic commit per table), and `ip rule` / `ip
//! route` for TPROXY's policy routing.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::rules::{self, Config, Family, Live};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("cannot run `{0}`: {1}")]
    Spawn(String, #[source] std::io::Error),
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
}

fn tools(f: Family) -> (&'static str, &'static str) {
    match f {
        Family::V4 => ("iptables-save", "iptables-restore"),
        Family::V6 => ("ip6tables-save", "ip6tables-restore"),
    }
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, ApplyError> {
    let shown = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ApplyError::Spawn(shown.clone(), e))?;
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|e| ApplyError::Spawn(shown.clone(), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| ApplyError::Spawn(shown.clone(), e))?;
    if !out.status.success() {
        return Err(ApplyError::Failed {
            command: shown,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Our chains and rules as they are live.
pub fn live(f: Family) -> Result<Live, ApplyError> {
    let (save, _) = tools(f);
    let mut text = run(save, &["-t", "nat"], None)?;
    text.push_str(&run(save, &["-t", "mangle"], None)?);
    text.push_str(&run(save, &["-t", "filter"], None)?);
    Ok(rules::parse_save(&text))
}

fn ip_rule_present(cfg: &Config, f: Family) -> Result<bool, ApplyError> {
    let flag = if f == Family::V4 { "-4" } else { "-6" };
    let out = run("ip", &[flag, "rule", "show"], None)?;
    let want = format!("fwmark 0x{:x} lookup {}", cfg.tproxy_mark, cfg.route_table);
    Ok(out.lines().any(|l| l.contains(&want)))
}

fn ip_route_present(cfg: &Config, f: Family) -> Result<bool, ApplyError> {
    let flag = if f == Family::V4 { "-4" } else { "-6" };
    // `show table N` fails while the table does not exist: list all tables instead.
    let out = run("ip", &[flag, "route", "show", "table", "all"], None)?;
    let table = format!("table {}", cfg.route_table);
    Ok(out.lines().any(|l| {
        l.starts_with("local")
            && l.contains("dev lo")
            && l.split(' ')
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| w.join(" ") == table)
    }))
}

/// Where the kernel keeps the ports it never hands out as ephemeral ports (both
/// families; per network namespace; `Documentation/networking/ip-sysctl.rst`).
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

fn sysctl_error(e: std::io::Error) -> ApplyError {
    ApplyError::Spawn(format!("write {RESERVED_PORTS}"), e)
}

/// conntrack's per-flow packet and byte counters (per network namespace; exists once
/// a rule uses conntrack).
const CONNTRACK_ACCT: &str = "/proc/sys/net/netfilter/nf_conntrack_acct";

/// Turns on conntrack's counters, which the enforcer reads when an inbound UDP session
/// it accepted (and the kernel carried) ends. Left on by `--cleanup`: counting changes
/// no packet's fate.
pub fn count_flows(cfg: &Config) -> Result<(), ApplyError> {
    if cfg.tcp_only {
        return Ok(());
    }
    std::fs::write(CONNTRACK_ACCT, "1")
        .map_err(|e| ApplyError::Spawn(format!("write {CONNTRACK_ACCT}"), e))
}

fn flows_counted() -> bool {
    std::fs::read_to_string(CONNTRACK_ACCT).is_ok_and(|s| s.trim() == "1")
}

/// Reserves the enforcer's ports (keeping what was reserved). Idempotent.
pub fn reserve_ports(cfg: &Config) -> Result<(), ApplyError> {
    let now = std::fs::read_to_string(RESERVED_PORTS).map_err(sysctl_error)?;
    let want = rules::reserved_with(&now, &rules::enforcer_ports(cfg));
    std::fs::write(RESERVED_PORTS, want).map_err(sysctl_error)
}

/// Gives the enforcer's ports back (leaving other reservations).
pub fn release_ports(cfg: &Config) -> Result<(), ApplyError> {
    let now = std::fs::read_to_string(RESERVED_PORTS).map_err(sysctl_error)?;
    let want = rules::reserved_without(&now, &rules::enforcer_ports(cfg));
    // An empty write is refused by the kernel; a newline clears the list.
    std::fs::write(RESERVED_PORTS, format!("{want}\n")).map_err(sysctl_error)
}

/// Whether the enforcer's ports are all reserved.
pub fn ports_reserved(cfg: &Config) -> Result<bool, ApplyError> {
    let now = std::fs::read_to_string(RESERVED_PORTS).map_err(sysctl_error)?;
    Ok(rules::reserved_with(&now, &rules::enforcer_ports(cfg)) == rules::reserved_with(&now, &[]))
}

/// Installs (or refreshes) the rules of one family, and (with IPv4, for both families)
/// reserves the enforcer's ports. Idempotent.
pub fn apply(cfg: &Config, f: Family) -> Result<(), ApplyError> {
    if f == Family::V4 {
        reserve_ports(cfg)?;
    }
    let (add, _) = rules::route_commands(cfg, f);
    if !ip_rule_present(cfg, f)? {
        run("ip", &add[0].split(' ').collect::<Vec<_>>(), None)?;
    }
    run("ip", &add[1].split(' ').collect::<Vec<_>>(), None)?;
    let payload = rules::install_payload(&cfg.rules(f), &live(f)?);
    let (_, restore) = tools(f);
    run(restore, &["-w", "5", "--noflush"], Some(&payload))?;
    count_flows(cfg)
}

/// Problems found by `--check` for one family (empty: all as configured).
pub fn check(cfg: &Config, f: Family) -> Result<Vec<String>, ApplyError> {
    let (missing, unexpected) = rules::diff(&cfg.rules(f), &live(f)?);
    let mut problems: Vec<String> = missing
        .into_iter()
        .map(|m| format!("missing {m}"))
        .collect();
    problems.extend(unexpected.into_iter().map(|u| format!("unexpected {u}")));
    if !ip_rule_present(cfg, f)? {
        problems.push(format!(
            "missing ip rule: fwmark 0x{:x} lookup {}",
            cfg.tproxy_mark, cfg.route_table
        ));
    }
    if !ip_route_present(cfg, f)? {
        problems.push(format!(
            "missing local default route in table {}",
            cfg.route_table
        ));
    }
    if f == Family::V4 && !ports_reserved(cfg)? {
        problems.push(format!(
            "the enforcer's ports {:?} are not all in net.ipv4.ip_local_reserved_ports",
            rules::enforcer_ports(cfg)
        ));
    }
    if !cfg.tcp_only && !flows_counted() {
        problems.push(format!(
            "conntrack accounting is off ({CONNTRACK_ACCT}): inbound UDP sessions are recorded without byte counts"
        ));
    }
    Ok(problems)
}

/// Removes everything of ours of one family. Idempotent.
pub fn cleanup(cfg: &Config, f: Family) -> Result<(), ApplyError> {
    let payload = rules::cleanup_payload(&live(f)?);
    if !payload.is_empty() {
        let (_, restore) = tools(f);
        run(restore, &["-w", "5", "--noflush"], Some(&payload))?;
    }
    let (_, del) = rules::route_commands(cfg, f);
    while ip_rule_present(cfg, f)? {
        run("ip", &del[0].split(' ').collect::<Vec<_>>(), None)?;
    }
    if ip_route_present(cfg, f)? {
        run("ip", &del[1].split(' ').collect::<Vec<_>>(), None)?;
    }
    if f == Family::V4 {
        release_ports(cfg)?;
    }
    Ok(())
}

/// Whether the kernel has IPv6 at all (if not, nothing can bypass through it).
pub fn ipv6_available() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}
