//! `segmesh-iptables-init`: installs, checks or removes segmesh's capture rules.

use std::process::ExitCode;

use clap::Parser;
use ipnet::IpNet;
use segmesh_iptables_init::apply;
use segmesh_iptables_init::rules::{self, Config, Family, Mode};

#[derive(Parser)]
#[command(
    name = "segmesh-iptables-init",
    version,
    about = "Capture a workload's traffic into its segmesh enforcer (IPv4 and IPv6; TCP and UDP, other protocols dropped but ICMP echo decided)"
)]
struct Cli {
    #[arg(long, value_enum, default_value = "sidecar")]
    mode: Mode,
    /// The enforcer's uid; its own connections are not captured.
    #[arg(long, default_value_t = 1337, env = "SEGMESH_PROXY_UID")]
    proxy_uid: u32,
    #[arg(long, env = "SEGMESH_PROXY_GID")]
    proxy_gid: Option<u32>,
    /// The mark every enforcer socket sets (SO_MARK): the uid/gid exemption needs it too.
    #[arg(long, default_value = "0x1337", value_parser = parse_u32, env = "SEGMESH_ENFORCER_MARK")]
    enforcer_mark: u32,
    /// Also exclude packets with this mark, whatever their owner (decimal or 0x hex).
    #[arg(long, value_parser = parse_u32)]
    proxy_mark: Option<u32>,
    #[arg(long, default_value_t = 15001)]
    outbound_port: u16,
    #[arg(long, default_value_t = 15006)]
    inbound_port: u16,
    #[arg(long, default_value_t = 15008)]
    tunnel_port: u16,
    #[arg(long, default_value_t = 15020)]
    admin_port: u16,
    /// Outbound destination ports left alone (comma separated, repeatable).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_ports: Vec<u16>,
    /// Inbound destination ports left alone.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_ports: Vec<u16>,
    /// Outbound destinations left alone (CIDRs, v4 or v6).
    #[arg(long, value_delimiter = ',')]
    exclude_outbound_cidrs: Vec<IpNet>,
    /// Inbound sources left alone (CIDRs), e.g. an admin network's SSH in host mode.
    #[arg(long, value_delimiter = ',')]
    exclude_inbound_cidrs: Vec<IpNet>,
    #[arg(long, default_value = "0x539", value_parser = parse_u32)]
    tproxy_mark: u32,
    /// The NFQUEUE number ICMP echo requests go to (the enforcer's `echo_queue`).
    #[arg(long, default_value_t = 1337)]
    echo_queue: u16,
    #[arg(long, default_value_t = 133)]
    route_table: u32,
    /// Capture TCP only: UDP, ICMP and other protocols pass unmediated, bypassing
    /// policy (for a host whose other traffic no policy describes yet).
    #[arg(long)]
    tcp_only: bool,
    /// Print what would be applied, change nothing.
    #[arg(long, conflicts_with_all = ["check", "cleanup"])]
    dry_run: bool,
    /// Exit 1 if the live rules differ from the configured ones.
    #[arg(long, conflicts_with = "cleanup")]
    check: bool,
    /// Remove everything this tool installed.
    #[arg(long)]
    cleanup: bool,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("`{s}`: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = Config {
        mode: cli.mode,
        proxy_uid: cli.proxy_uid,
        proxy_gid: cli.proxy_gid,
        enforcer_mark: cli.enforcer_mark,
        proxy_mark: cli.proxy_mark,
        outbound_port: cli.outbound_port,
        inbound_port: cli.inbound_port,
        tunnel_port: cli.tunnel_port,
        admin_port: cli.admin_port,
        exclude_outbound_ports: cli.exclude_outbound_ports,
        exclude_inbound_ports: cli.exclude_inbound_ports,
        exclude_outbound_cidrs: cli.exclude_outbound_cidrs,
        exclude_inbound_cidrs: cli.exclude_inbound_cidrs,
        echo_queue: cli.echo_queue,
        tproxy_mark: cli.tproxy_mark,
        route_table: cli.route_table,
        tcp_only: cli.tcp_only,
    };
    let families: Vec<Family> = if apply::ipv6_available() {
        vec![Family::V4, Family::V6]
    } else {
        eprintln!("note: this kernel has no IPv6; capturing IPv4 only");
        vec![Family::V4]
    };
    if cli.dry_run {
        for f in families {
            let (add, _) = rules::route_commands(&cfg, f);
            println!("# {f:?}: policy routing");
            for c in add {
                println!("# ip {c}");
            }
            println!(
                "# {f:?}: {}-restore --noflush payload",
                if f == Family::V4 {
                    "iptables"
                } else {
                    "ip6tables"
                }
            );
            print!(
                "{}",
                rules::install_payload(&cfg.rules(f), &rules::Live::default())
            );
        }
        return ExitCode::SUCCESS;
    }
    let mut problems = Vec::new();
    for f in families {
        let result = if cli.check {
            apply::check(&cfg, f)
                .map(|p| problems.extend(p.into_iter().map(|x| format!("{f:?}: {x}"))))
        } else if cli.cleanup {
            apply::cleanup(&cfg, f)
        } else {
            apply::apply(&cfg, f)
        };
        if let Err(e) = result {
            eprintln!("error: {f:?}: {e}");
            return ExitCode::from(2);
        }
    }
    if cli.check {
        if problems.is_empty() {
            println!("capture rules are in place");
        } else {
            for p in &problems {
                println!("{p}");
            }
            return ExitCode::from(1);
        }
    }
    ExitCode::SUCCESS
}
