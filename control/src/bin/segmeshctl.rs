//! `segmeshctl`: the segmesh command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use segmesh_control::files::read_sources;
use segmesh_control::offline::{self, FlowSpec};
use segmesh_control::style::Style;
use segmesh_policy::{Address, CaseEnd, Engine, NamespacePath, PortRange, TagSet};

/// Exit code for failing test cases.
const EXIT_FAILED: u8 = 1;
/// Exit code for invalid input (files, flags).
const EXIT_INVALID: u8 = 2;

#[derive(Parser)]
#[command(name = "segmeshctl", version, about = "segmesh command line")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How to reach the console.
#[derive(clap::Args, Clone)]
struct Remote {
    /// The console's API, https://host:port.
    #[arg(long, env = "SEGMESH_CONSOLE")]
    console: String,
    /// An API token (or its file with `@path`).
    #[arg(long, env = "SEGMESH_TOKEN", hide_env_values = true)]
    token: String,
    /// The console's CA (its data dir's `ca/bundle.crt`).
    #[arg(long, env = "SEGMESH_CA")]
    ca_file: String,
}

/// `--live`: take policies from the console instead of the files.
#[derive(clap::Args, Clone)]
struct Live {
    /// Evaluate against the console's live policies (the files then provide only the
    /// test cases).
    #[arg(long)]
    live: bool,
    #[arg(long, env = "SEGMESH_CONSOLE", requires = "live")]
    console: Option<String>,
    #[arg(long, env = "SEGMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[arg(long, env = "SEGMESH_CA")]
    ca_file: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Viewer,
    Editor,
    /// A bootstrap token for enforcers (`--allow-tag` limits the tags they get).
    Enforcer,
}

#[derive(Clone, Copy, ValueEnum)]
enum Algorithm {
    /// ECDSA P-256 (default).
    P256,
    Ed25519,
}

impl From<Algorithm> for segmesh_identity::KeyAlgorithm {
    fn from(a: Algorithm) -> Self {
        match a {
            Algorithm::P256 => segmesh_identity::KeyAlgorithm::EcdsaP256,
            Algorithm::Ed25519 => segmesh_identity::KeyAlgorithm::Ed25519,
        }
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA: DIR/ca.crt, DIR/ca.key (0600), DIR/bundle.crt.
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = segmesh_identity::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
        /// A root that signs an intermediate; the intermediate signs workloads and the
        /// root key (DIR/root.key) can go offline.
        #[arg(long)]
        intermediate: bool,
        #[arg(long, value_enum, default_value = "p256")]
        algorithm: Algorithm,
    },
    /// Issue a workload certificate: OUT.crt, OUT.key (0600), OUT.bundle.crt.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "/")]
        namespace: String,
        /// A tag `key=value`; repeatable.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Lifetime (`1h`, `30m`, `7d`); at most 30 days.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        #[arg(long, value_enum, default_value = "p256")]
        algorithm: Algorithm,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the identity, tags and validity of the certificates in a PEM file.
    Inspect { file: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

// Parsed once per run; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Validate files and write them into the console's draft (all or nothing).
    Apply {
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show the draft against what is live.
    Diff {
        #[command(flatten)]
        remote: Remote,
    },
    /// Publish the draft as a new version.
    Commit {
        #[command(flatten)]
        remote: Remote,
    },
    /// Republish an earlier version (default: the one before the live one).
    Rollback {
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show live policies or registered processing units.
    Get {
        /// What to show: `policies`, `pus`, `services`, `externalnetworks` or `namespaces`.
        what: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Remove a policy from the draft, or delete a registered PU (at once: it leaves
    /// every enforcer's registry and its certificate is no longer renewed).
    Delete {
        /// `policy`, `externalnetwork` or `pu`.
        what: String,
        /// The namespace path.
        namespace: String,
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Create an API token (printed once).
    Token {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        #[arg(long, default_value = "/")]
        namespace: String,
        /// For enforcer tokens: a tag pattern (`key=value`, `key=*`) PUs may be certified
        /// with; repeatable.
        #[arg(long = "allow-tag")]
        allow_tags: Vec<String>,
        /// For enforcer tokens: PUs may register from an address they do not claim
        /// (behind NAT); by default a PU registers from one of its own addresses.
        #[arg(long)]
        any_source: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Least-privilege Allow policies (YAML, ready for `apply -f`) from the flows
    /// discovery mode let through: stable tags, never addresses; ports as seen.
    Suggest {
        /// Only flows whose enforcing PU is in this namespace or below.
        #[arg(long, default_value = "/")]
        namespace: String,
        /// Only flows this recent.
        #[arg(long, default_value = "1h")]
        since: humantime::Duration,
        /// Write the YAML here instead of stdout.
        #[arg(short = 'o', long = "out")]
        out: Option<PathBuf>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Add the segmesh init container and sidecar to Kubernetes manifests (Pod,
    /// Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, List;
    /// multi-document). Idempotent; pods annotated `segmesh.io/inject: "false"` are
    /// skipped; other documents are copied unchanged.
    Inject {
        /// The manifest file, or `-` for stdin.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The image holding segmesh-proxy and segmesh-iptables-init.
        #[arg(long)]
        image: Option<String>,
        /// The console's API as seen from pods.
        #[arg(long = "console-url")]
        console_url: Option<String>,
        /// The Secret (key `token`) holding the bootstrap token.
        #[arg(long, default_value = "segmesh-bootstrap")]
        token_secret: String,
        /// The ConfigMap (key `ca.crt`) holding the console's CA.
        #[arg(long, default_value = "segmesh-console-ca")]
        ca_configmap: String,
        /// The PUs' segmesh namespace (default `/k8s/<kubernetes namespace>`).
        #[arg(long)]
        namespace: Option<String>,
    },
    /// Flow records reported by enforcers, oldest first.
    Flows {
        /// A PU (`<namespace>:<name>` or a name) at either end.
        #[arg(long)]
        pu: Option<String>,
        #[arg(long, value_parser = ["allow", "reject"])]
        verdict: Option<String>,
        /// Only flows that started this recently (`10m`, `1h`).
        #[arg(long)]
        since: Option<humantime::Duration>,
        /// Only the last N records.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        remote: Remote,
    },
    /// Revoke the tokens named NAME (API or bootstrap tokens). Enforcers registered with
    /// a revoked bootstrap token keep working with their certificates.
    Revoke {
        name: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show the console's audit log.
    Audit {
        #[command(flatten)]
        remote: Remote,
    },
    /// An offline certificate authority (host mode, labs, tests).
    #[command(subcommand)]
    Ca(CaCommand),
    /// Evaluate the PolicyTest cases in the files against the policies in the files;
    /// exit 1 on any failing case, 2 on invalid input.
    Test {
        /// Files or folders (searched recursively for *.yaml, *.yml).
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        #[command(flatten)]
        live: Live,
    },
    /// Print the decision path of one flow at each enforcing end.
    Explain {
        #[arg(short = 'f', long = "file", required_unless_present = "live")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        live: Live,
        /// The client's tags, comma separated (`app=web,env=prod`); repeatable.
        #[arg(long, conflicts_with_all = ["from_ip", "from_domain"])]
        from: Vec<String>,
        /// The client is an address outside the mesh.
        #[arg(long)]
        from_ip: Option<std::net::IpAddr>,
        #[arg(long)]
        from_domain: Option<String>,
        /// The server's tags, comma separated; repeatable.
        #[arg(long, conflicts_with_all = ["to_ip", "to_domain"])]
        to: Vec<String>,
        #[arg(long)]
        to_ip: Option<std::net::IpAddr>,
        #[arg(long)]
        to_domain: Option<String>,
        /// The destination port: `tcp/N`, `udp/N` or `icmp`.
        #[arg(long)]
        port: String,
        /// Namespace of both ends (default `/`).
        #[arg(long, default_value = "/")]
        namespace: String,
        #[arg(long)]
        from_namespace: Option<String>,
        #[arg(long)]
        to_namespace: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

fn end(
    tags: &[String],
    ip: Option<std::net::IpAddr>,
    domain: Option<String>,
    what: &str,
) -> anyhow::Result<CaseEnd> {
    if ip.is_some() || domain.is_some() {
        return Ok(CaseEnd::Address(Address { ip, domain }));
    }
    if tags.is_empty() {
        anyhow::bail!("--{what} (tags), --{what}-ip or --{what}-domain is required");
    }
    let set = TagSet::parse(
        tags.iter()
            .flat_map(|t| t.split(','))
            .filter(|t| !t.is_empty()),
    )
    .map_err(|e| anyhow::anyhow!("--{what}: {e}"))?;
    Ok(if set.is_external() {
        CaseEnd::External(set)
    } else {
        CaseEnd::Pu(set)
    })
}

fn load_engine(files: &[PathBuf]) -> Result<(Engine, Vec<segmesh_policy::TestCase>), ExitCode> {
    let sources = read_sources(files).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    })?;
    let loaded = offline::load_files(&sources).map_err(|e| {
        eprintln!(
            "{} error(s) in the input; nothing was evaluated:",
            e.diagnostics.len()
        );
        for d in &e.diagnostics {
            eprintln!("error: {d}");
        }
        ExitCode::from(EXIT_INVALID)
    })?;
    Ok((Engine::compile(loaded.set), loaded.tests))
}

fn client(r: &Remote) -> Result<segmesh_control::client::Client, ExitCode> {
    let token = match r.token.strip_prefix('@') {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => t.trim().to_owned(),
            Err(e) => {
                eprintln!("error: token file {path}: {e}");
                return Err(ExitCode::from(EXIT_INVALID));
            }
        },
        None => r.token.clone(),
    };
    segmesh_control::client::Client::new(&r.console, &token, &r.ca_file).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_INVALID)
    })
}

/// Runs one API call and prints its answer with `show`.
fn remote(
    r: &Remote,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
    show: impl Fn(&serde_json::Value),
) -> ExitCode {
    let c = match client(r) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match c.call(method, path, body) {
        Ok(v) => {
            show(&v);
            ExitCode::SUCCESS
        }
        Err(segmesh_control::client::ClientError::Status { status, body }) => {
            if let Some(d) = body["diagnostics"].as_array() {
                eprintln!("{} error(s); nothing was applied:", d.len());
                for x in d {
                    let l = &x["location"];
                    let field = x["field"]
                        .as_str()
                        .map(|f| format!("field `{f}`: "))
                        .unwrap_or_default();
                    eprintln!(
                        "error: {}:{}:{}: {field}{}",
                        l["file"].as_str().unwrap_or("?"),
                        l["line"],
                        l["column"],
                        x["message"].as_str().unwrap_or("")
                    );
                }
                return ExitCode::from(EXIT_INVALID);
            }
            eprintln!(
                "error ({status}): {}",
                body["error"].as_str().unwrap_or("?")
            );
            ExitCode::from(EXIT_FAILED)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn list(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn show_changes(v: &serde_json::Value) {
    for (key, mark) in [("added", "+"), ("changed", "~"), ("removed", "-")] {
        for x in list(v, key) {
            println!("{mark} {x}");
        }
    }
    println!(
        "{} added, {} changed, {} removed, {} unchanged",
        list(v, "added").len(),
        list(v, "changed").len(),
        list(v, "removed").len(),
        list(v, "unchanged").len()
    );
}

/// The engine (and test cases) from files, or with `--live` from the console's live
/// policies (cases still from the files).
fn engine_for(
    files: &[PathBuf],
    live: &Live,
) -> Result<(Engine, Vec<segmesh_policy::TestCase>), ExitCode> {
    if !live.live {
        return load_engine(files);
    }
    let (Some(console), Some(token), Some(ca)) = (&live.console, &live.token, &live.ca_file) else {
        eprintln!(
            "error: --live needs --console, --token and --ca-file (or SEGMESH_CONSOLE, SEGMESH_TOKEN, SEGMESH_CA)"
        );
        return Err(ExitCode::from(EXIT_INVALID));
    };
    let tests = if files.is_empty() {
        Vec::new()
    } else {
        let (local, tests) = load_engine(files)?;
        if !local.set().policies().is_empty() {
            eprintln!(
                "note: --live: the {} policies in the files are ignored; the console's live ones are used",
                local.set().policies().len()
            );
        }
        tests
    };
    let remote = Remote {
        console: console.clone(),
        token: token.clone(),
        ca_file: ca.clone(),
    };
    let c = client(&remote)?;
    let docs = c.call("GET", "/v1/documents", None).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_FAILED)
    })?;
    let set = offline::set_from_documents(&docs).map_err(|e| {
        eprintln!("error: the console's documents: {e}");
        ExitCode::from(EXIT_FAILED)
    })?;
    eprintln!(
        "using live version {} ({} policies)",
        docs["version"],
        set.policies().len()
    );
    Ok((Engine::compile(set), tests))
}

/// One line per flow: when, who to whom, verdict and why, how the bytes moved.
fn show_flows(v: &serde_json::Value, style: Style) {
    let end = |e: &serde_json::Value| match (e["pu"].as_str(), e["external"].as_array()) {
        (Some(pu), _) => pu.to_owned(),
        (None, Some(x)) if !x.is_empty() => x
            .iter()
            .filter_map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join("|"),
        _ => e["ip"].as_str().unwrap_or("?").to_owned(),
    };
    let rows: Vec<&serde_json::Value> = v.as_array().into_iter().flatten().collect();
    println!(
        "{:<24} {:<22} {:<22} {:>6} {:<7} {:<24} {:<10} {:>10} {:>10} close",
        "time", "from", "to", "port", "verdict", "by", "path", "sent", "received"
    );
    for f in &rows {
        let r = &f["record"];
        let verdict = r["verdict"].as_str().unwrap_or("");
        let by = r["policies"]
            .as_array()
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| r["reason"].as_str().unwrap_or("").to_owned());
        let painted = if verdict == "allow" {
            style.green(&format!("{verdict:<7}"))
        } else {
            style.red(&format!("{verdict:<7}"))
        };
        println!(
            "{:<24} {:<22} {:<22} {:>6} {} {:<24} {:<10} {:>10} {:>10} {}",
            r["time"].as_str().unwrap_or(""),
            end(&r["source"]),
            end(&r["destination"]),
            r["destination"]["port"],
            painted,
            by,
            r["data_path"].as_str().unwrap_or("-"),
            r["bytes_sent"],
            r["bytes_received"],
            r["close_reason"].as_str().unwrap_or("")
        );
    }
    println!("{} flow records", rows.len());
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let style = Style::detect();
    match cli.command {
        Command::Apply { files, remote: r } => {
            let sources = match read_sources(&files) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_INVALID);
                }
            };
            let files: Vec<serde_json::Value> = sources
                .iter()
                .map(|f| serde_json::json!({"name": f.name, "text": f.text}))
                .collect();
            remote(
                &r,
                "POST",
                "/v1/apply",
                Some(serde_json::json!({ "files": files })),
                |v| {
                    show_changes(v);
                    println!(
                        "written to the draft; `segmeshctl diff` to review, `segmeshctl commit` to publish"
                    );
                },
            )
        }
        Command::Diff { remote: r } => remote(&r, "GET", "/v1/diff", None, show_changes),
        Command::Commit { remote: r } => remote(&r, "POST", "/v1/commit", None, |v| {
            println!("published version {}", v["version"])
        }),
        Command::Rollback { to, remote: r } => remote(
            &r,
            "POST",
            "/v1/rollback",
            Some(serde_json::json!({ "to": to })),
            |v| println!("published version {}", v["version"]),
        ),
        Command::Get { what, remote: r } => {
            if what == "pus" {
                return remote(&r, "GET", "/v1/processingunits", None, |v| {
                    for p in v.as_array().into_iter().flatten() {
                        let list = |k: &str| {
                            p[k].as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|x| x.as_str())
                                .collect::<Vec<_>>()
                                .join(",")
                        };
                        println!(
                            "{}:{}  ips {}  tags {}  registered {}",
                            p["namespace"].as_str().unwrap_or(""),
                            p["name"].as_str().unwrap_or(""),
                            list("ips"),
                            list("tags"),
                            p["registered_at"].as_str().unwrap_or("")
                        );
                    }
                });
            }
            if what == "services" {
                return remote(&r, "GET", "/v1/services", None, |v| {
                    for s in v["services"].as_array().into_iter().flatten() {
                        let addresses: Vec<String> = s["addresses"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|a| a.as_str().map(str::to_owned))
                            .collect();
                        let ports: Vec<String> = s["ports"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|p| {
                                format!(
                                    "{}/{}->{}",
                                    p["protocol"].as_str().unwrap_or("tcp"),
                                    p["port"],
                                    p["target"]
                                )
                            })
                            .collect();
                        let endpoints: Vec<String> = s["endpoints"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|e| match e["pu"].as_str() {
                                Some(pu) => format!("{}({pu})", e["ip"].as_str().unwrap_or("")),
                                None => e["ip"].as_str().unwrap_or("").to_owned(),
                            })
                            .collect();
                        println!(
                            "{}  addresses {}  ports {}  endpoints {}",
                            s["name"].as_str().unwrap_or(""),
                            addresses.join(","),
                            ports.join(","),
                            if endpoints.is_empty() {
                                "none".to_owned()
                            } else {
                                endpoints.join(",")
                            }
                        );
                    }
                });
            }
            if what == "externalnetworks" || what == "namespaces" {
                let path = format!("/v1/{what}");
                return remote(&r, "GET", &path, None, |v| {
                    println!("version {}", v["version"]);
                    for d in v[what.as_str()].as_array().into_iter().flatten() {
                        println!("{}", serde_json::to_string(d).unwrap_or_default());
                    }
                });
            }
            if what != "policies" {
                eprintln!(
                    "error: `get` knows `policies`, `pus`, `services`, `externalnetworks` and `namespaces`"
                );
                return ExitCode::from(EXIT_INVALID);
            }
            remote(&r, "GET", "/v1/policies", None, |v| {
                println!("version {}", v["version"]);
                for p in v["policies"].as_array().into_iter().flatten() {
                    println!(
                        "{}:{}  {} {}",
                        p["namespace"].as_str().unwrap_or(""),
                        p["name"].as_str().unwrap_or(""),
                        p["action"].as_str().unwrap_or(""),
                        p["mode"].as_str().unwrap_or("")
                    );
                }
            })
        }
        Command::Delete {
            what,
            namespace,
            name,
            remote: r,
        } => {
            if what == "pu" {
                let path = format!(
                    "/v1/processingunits{}/{name}",
                    namespace.trim_end_matches('/')
                );
                return remote(&r, "DELETE", &path, None, |_| {
                    println!("deleted; enforcers drop it with the next push")
                });
            }
            if what == "service" {
                let path = format!("/v1/services{}/{name}", namespace.trim_end_matches('/'));
                return remote(&r, "DELETE", &path, None, |_| {
                    println!("removed from the draft")
                });
            }
            if what == "externalnetwork" {
                let path = format!(
                    "/v1/externalnetworks{}/{name}",
                    namespace.trim_end_matches('/')
                );
                return remote(&r, "DELETE", &path, None, |_| {
                    println!("removed from the draft")
                });
            }
            if what != "policy" {
                eprintln!("error: `delete` knows `policy`, `externalnetwork`, `service` and `pu`");
                return ExitCode::from(EXIT_INVALID);
            }
            let path = format!("/v1/policies{}/{name}", namespace.trim_end_matches('/'));
            remote(&r, "DELETE", &path, None, |_| {
                println!("removed from the draft")
            })
        }
        Command::Token {
            name,
            role,
            namespace,
            allow_tags,
            any_source,
            remote: r,
        } => {
            let role = match role {
                RoleArg::Viewer => "viewer",
                RoleArg::Editor => "editor",
                RoleArg::Enforcer => "enforcer",
            };
            let body = serde_json::json!({"name": name, "role": role, "namespace": namespace, "allowed_tags": allow_tags, "any_source": any_source});
            remote(&r, "POST", "/v1/tokens", Some(body), |v| {
                println!("{}", v["token"].as_str().unwrap_or(""))
            })
        }
        Command::Inject {
            file,
            image,
            console_url,
            token_secret,
            ca_configmap,
            namespace,
        } => {
            let text = if file.as_os_str() == "-" {
                let mut t = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut t).map(|_| t)
            } else {
                std::fs::read_to_string(&file)
            };
            let text = match text {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("error: {}: {e}", file.display());
                    return ExitCode::from(EXIT_INVALID);
                }
            };
            let defaults = segmesh_control::inject::Options::default();
            let opts = segmesh_control::inject::Options {
                image: image.unwrap_or(defaults.image),
                console: console_url.unwrap_or(defaults.console),
                token_secret,
                ca_configmap,
                namespace,
            };
            match segmesh_control::inject::inject_stream(&text, &opts) {
                Ok((out, reports)) => {
                    print!("{out}");
                    for r in reports {
                        eprintln!("{} {}: {}", r.kind, r.name, r.outcome);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", file.display());
                    ExitCode::from(EXIT_INVALID)
                }
            }
        }
        Command::Suggest {
            namespace,
            since,
            out,
            remote: r,
        } => {
            let ns: NamespacePath = match namespace.parse() {
                Ok(n) => n,
                Err(e) => {
                    eprintln!("error: --namespace: {e}");
                    return ExitCode::from(EXIT_INVALID);
                }
            };
            let c = match client(&r) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let path = format!(
                "/v1/flows?verdict=allow&since={}s&limit={}",
                since.as_secs(),
                segmesh_control::console::FLOWS_KEPT
            );
            let fetched = c
                .call("GET", &path, None)
                .and_then(|f| c.call("GET", "/v1/processingunits", None).map(|p| (f, p)));
            let (flows, pus) = match fetched {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_FAILED);
                }
            };
            let (flows, pus): (
                Vec<segmesh_control::store::StoredFlow>,
                Vec<segmesh_control::store::PuRecord>,
            ) = match (serde_json::from_value(flows), serde_json::from_value(pus)) {
                (Ok(f), Ok(p)) => (f, p),
                _ => {
                    eprintln!("error: the console's answer has an unexpected shape");
                    return ExitCode::from(EXIT_FAILED);
                }
            };
            let s = segmesh_control::suggest::suggest(&ns, &flows, &pus);
            let yaml = segmesh_control::suggest::to_yaml(
                &s,
                &format!(
                    "suggested by segmeshctl from {} discovered flows in {ns} over the last {since}",
                    s.flows
                ),
            );
            for why in &s.skipped {
                eprintln!("skipped: {why}");
            }
            eprintln!(
                "{} policies from {} discovered flows",
                s.policies.len(),
                s.flows
            );
            match out {
                Some(p) => {
                    if let Err(e) = std::fs::write(&p, yaml) {
                        eprintln!("error: {}: {e}", p.display());
                        return ExitCode::from(EXIT_FAILED);
                    }
                }
                None => print!("{yaml}"),
            }
            ExitCode::SUCCESS
        }
        Command::Revoke { name, remote: r } => {
            let path = format!("/v1/tokens/{}", segmesh_api::query_escape(&name));
            remote(&r, "DELETE", &path, None, |v| {
                println!("revoked {} token(s)", v["revoked"])
            })
        }
        Command::Flows {
            pu,
            verdict,
            since,
            limit,
            output,
            remote: r,
        } => {
            let mut q = vec![format!("limit={limit}")];
            if let Some(p) = pu {
                q.push(format!("pu={}", segmesh_api::query_escape(&p)));
            }
            if let Some(v) = verdict {
                q.push(format!("verdict={v}"));
            }
            if let Some(s) = since {
                q.push(format!("since={}s", s.as_secs()));
            }
            let path = format!("/v1/flows?{}", q.join("&"));
            remote(&r, "GET", &path, None, |v| match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
                Output::Table => show_flows(v, style),
            })
        }
        Command::Audit { remote: r } => remote(&r, "GET", "/v1/audit", None, |v| {
            for e in v.as_array().into_iter().flatten() {
                println!(
                    "{} {} {} {}",
                    e["time"].as_str().unwrap_or(""),
                    e["who"].as_str().unwrap_or(""),
                    e["action"].as_str().unwrap_or(""),
                    e["detail"].as_str().unwrap_or("")
                );
            }
        }),
        Command::Ca(cmd) => {
            use segmesh_control::ca_cli;
            let result = match cmd {
                CaCommand::Init {
                    dir,
                    trust_domain,
                    intermediate,
                    algorithm,
                } => ca_cli::init(&dir, &trust_domain, intermediate, algorithm.into()),
                CaCommand::Issue {
                    dir,
                    name,
                    namespace,
                    tags,
                    ttl,
                    algorithm,
                    out,
                } => ca_cli::issue(
                    &dir,
                    &namespace,
                    &name,
                    &tags,
                    ttl.into(),
                    algorithm.into(),
                    &out,
                ),
                CaCommand::Inspect { file } => ca_cli::inspect(&file),
            };
            match result {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_INVALID)
                }
            }
        }
        Command::Test {
            files,
            output,
            live,
        } => {
            let (engine, cases) = match engine_for(&files, &live) {
                Ok(x) => x,
                Err(code) => return code,
            };
            if cases.is_empty() {
                eprintln!("error: no PolicyTest cases in the input");
                return ExitCode::from(EXIT_INVALID);
            }
            let report = offline::run_tests(&engine, &cases);
            match output {
                Output::Table => print!("{}", offline::render_table(&report, style)),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("report serializes")
                ),
            }
            if report.failed > 0 {
                ExitCode::from(EXIT_FAILED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Explain {
            files,
            live,
            from,
            from_ip,
            from_domain,
            to,
            to_ip,
            to_domain,
            port,
            namespace,
            from_namespace,
            to_namespace,
            output,
        } => {
            let flow = (|| -> anyhow::Result<FlowSpec> {
                let ns: NamespacePath = namespace.parse()?;
                let from_end = end(&from, from_ip, from_domain, "from")?;
                let to_end = end(&to, to_ip, to_domain, "to")?;
                if !from_end.is_pu() && !to_end.is_pu() {
                    anyhow::bail!("at least one end must be a processing unit");
                }
                Ok(FlowSpec {
                    from: from_end,
                    to: to_end,
                    port: PortRange::single(&port)?,
                    from_namespace: from_namespace.map_or(Ok(ns.clone()), |s| s.parse())?,
                    to_namespace: to_namespace.map_or(Ok(ns.clone()), |s| s.parse())?,
                })
            })();
            let flow = match flow {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_INVALID);
                }
            };
            let (engine, _) = match engine_for(&files, &live) {
                Ok(x) => x,
                Err(code) => return code,
            };
            let (text, outcome) = offline::explain_flow(&engine, &flow, style);
            match output {
                Output::Table => print!("{text}"),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&outcome).expect("outcome serializes")
                ),
            }
            ExitCode::SUCCESS
        }
    }
}
