//! `segmesh-control`: the console. The first start in a data directory creates the CA,
//! the API's serving certificate and an admin token (`<data-dir>/admin.token`, 0600).
//! With `--store etcd`, several replicas share one etcd cluster: the first replica to
//! start creates the CA and the admin token and seals both into etcd under the
//! key-encryption key; every replica takes them from there.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use segmesh_control::console::Console;
use segmesh_control::shared::Kek;
use segmesh_control::store::{EtcdOptions, EtcdStore, RedbStore, Role, Store};
use segmesh_identity::{Ca, KeyAlgorithm, WorkloadKey};
use segmesh_policy::NamespacePath;

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    /// One redb file in the data directory: one console on one machine.
    Redb,
    /// An etcd cluster shared by several console replicas.
    Etcd,
}

#[derive(Parser)]
#[command(name = "segmesh-control", version, about = "segmesh console")]
struct Cli {
    /// Where the store (redb), the CA (redb) and the admin token live.
    #[arg(long, env = "SEGMESH_DATA_DIR")]
    data_dir: PathBuf,
    /// Where policies, PUs, tokens and the audit log live.
    #[arg(long, value_enum, default_value = "redb", env = "SEGMESH_STORE")]
    store: StoreKind,
    /// etcd members (`http://host:port`), comma separated or repeated (`--store etcd`).
    #[arg(long, value_delimiter = ',', env = "SEGMESH_ETCD_ENDPOINTS")]
    etcd_endpoints: Vec<String>,
    /// The CA of etcd's client certificates (its `--trusted-ca-file`'s issuer): TLS to
    /// etcd, with `https://` endpoints.
    #[arg(long, env = "SEGMESH_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// The console's client certificate for etcd (`--client-cert-auth`), with
    /// `--etcd-key`.
    #[arg(long, env = "SEGMESH_ETCD_CERT", requires_all = ["etcd_key", "etcd_ca"])]
    etcd_cert: Option<PathBuf>,
    #[arg(long, env = "SEGMESH_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Every key the console writes in etcd lives below this prefix.
    #[arg(long, default_value = "/segmesh/", env = "SEGMESH_ETCD_PREFIX")]
    etcd_prefix: String,
    /// The key-encryption key sealing the CA and the first admin token in etcd: 32
    /// bytes, raw or as 64 hexadecimal digits (`openssl rand -hex 32`); the same file on
    /// every replica (`--store etcd`).
    #[arg(long, env = "SEGMESH_KEK_FILE")]
    kek_file: Option<PathBuf>,
    /// The API's address.
    #[arg(long, env = "SEGMESH_LISTEN", default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    #[arg(long, default_value = segmesh_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Extra DNS names for the API's certificate.
    #[arg(long)]
    dns_name: Vec<String>,
    /// Lifetime of the certificates issued to enforcers (renewed at 2/3 of it).
    #[arg(long, default_value = "1h")]
    cert_ttl: humantime::Duration,
    /// Sidecar injection (admission webhook): the image holding segmesh-proxy and
    /// segmesh-iptables-init.
    #[arg(long)]
    inject_image: Option<String>,
    /// Sidecar injection: the console's API as seen from pods.
    #[arg(long)]
    inject_console_url: Option<String>,
    /// Follow the Kubernetes cluster of this kubeconfig: its Services become segmesh
    /// Services, its pods' labels, namespaces and service accounts the registering
    /// PUs' tags.
    #[arg(
        long,
        env = "SEGMESH_KUBECONFIG",
        conflicts_with = "kubernetes_in_cluster"
    )]
    kubeconfig: Option<PathBuf>,
    /// Follow the cluster the console runs in (its service account's token and CA).
    #[arg(long, env = "SEGMESH_KUBERNETES_IN_CLUSTER")]
    kubernetes_in_cluster: bool,
    /// How long a PU stays registered after its enforcer last watched or renewed (its
    /// addresses are then free for another PU).
    #[arg(long, default_value = "90s")]
    pu_lease: humantime::Duration,
    /// How often the cluster's watches start over with a full list (repairs drift).
    #[arg(long, default_value = "10m")]
    kubernetes_resync: humantime::Duration,
}

fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| path.display().to_string())?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Every enforcer (console) or connection (enforcer) holds a descriptor: use what the
    // hard limit allows rather than the common soft 1,024.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    std::fs::create_dir_all(&cli.data_dir)
        .with_context(|| format!("data directory {}", cli.data_dir.display()))?;
    let ca_dir = cli.data_dir.join("ca");
    match cli.store {
        StoreKind::Redb => {
            if !cli.etcd_endpoints.is_empty() || cli.kek_file.is_some() || cli.etcd_ca.is_some() {
                anyhow::bail!("--etcd-endpoints, --etcd-ca and --kek-file go with --store etcd");
            }
            let fresh = !ca_dir.join("ca.key").exists();
            let ca = if fresh {
                let ca = Ca::new_root(&cli.trust_domain, KeyAlgorithm::EcdsaP256)?;
                ca.save(&ca_dir)?;
                ca
            } else {
                Ca::load(&ca_dir)?
            };
            let console = Console::new(RedbStore::open(&cli.data_dir)?);
            let admin = if fresh {
                Some(console.create_token(None, "admin", Role::Editor, &NamespacePath::root())?)
            } else {
                None
            };
            run(cli, console, ca, admin).await
        }
        StoreKind::Etcd => {
            if cli.etcd_endpoints.is_empty() {
                anyhow::bail!("--store etcd needs --etcd-endpoints");
            }
            let kek_file = cli
                .kek_file
                .clone()
                .context("--store etcd needs --kek-file (the key sealing the CA in etcd)")?;
            let kek = Kek::load(&kek_file)?;
            let mut opts = EtcdOptions::new(cli.etcd_endpoints.clone());
            opts.prefix = cli.etcd_prefix.clone();
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("read {}", p.display()))
            };
            if let Some(ca) = &cli.etcd_ca {
                opts.tls = Some(segmesh_control::store::EtcdTls {
                    ca_pem: read(ca)?,
                    identity: match (&cli.etcd_cert, &cli.etcd_key) {
                        (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
                        _ => None,
                    },
                });
            }
            let store = EtcdStore::connect(&opts).context("connect to etcd")?;
            let td = cli.trust_domain.clone();
            let (ca, created) = segmesh_control::shared::shared_ca(&store, &kek, || {
                Ok(Ca::new_root(&td, KeyAlgorithm::EcdsaP256)?)
            })?;
            // The bundle where enforcers and segmeshctl expect it (no key on disk).
            std::fs::create_dir_all(&ca_dir)?;
            std::fs::write(ca_dir.join("bundle.crt"), ca.bundle_pem())?;
            let console = Console::new(store);
            let admin = if created {
                let token =
                    console.create_token(None, "admin", Role::Editor, &NamespacePath::root())?;
                segmesh_control::shared::publish_admin_token(&console.store, &kek, &token)?;
                tracing::info!("a new console: CA and admin token created and sealed in etcd");
                Some(token)
            } else {
                // Written by the replica that created the CA, moments ago perhaps.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                loop {
                    if let Some(t) = segmesh_control::shared::admin_token(&console.store, &kek)? {
                        break (!cli.data_dir.join("admin.token").exists()).then_some(t);
                    }
                    if std::time::Instant::now() > deadline {
                        tracing::warn!(
                            "no admin token in etcd yet: the replica that created the CA did not publish one"
                        );
                        break None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            run(cli, console, ca, admin).await
        }
    }
}

async fn run<S: Store + 'static>(
    cli: Cli,
    mut console: Console<S>,
    ca: Ca,
    admin: Option<String>,
) -> anyhow::Result<()> {
    let ca_dir = cli.data_dir.join("ca");
    if *cli.cert_ttl < Duration::from_secs(5) || *cli.cert_ttl > Duration::from_secs(30 * 24 * 3600)
    {
        anyhow::bail!("--cert-ttl must be between 5s and 30d");
    }
    console.cert_ttl = *cli.cert_ttl;
    if *cli.pu_lease < Duration::from_secs(2) {
        anyhow::bail!("--pu-lease must be at least 2s");
    }
    console.lease = *cli.pu_lease;
    if let Some(token) = admin {
        write_private(&cli.data_dir.join("admin.token"), &format!("{token}\n"))?;
        tracing::info!(file = %cli.data_dir.join("admin.token").display(), "admin token written");
    }
    // The API's certificate: a fresh key every start, named by the listen address.
    let key = WorkloadKey::generate(KeyAlgorithm::EcdsaP256)?;
    let mut ips: Vec<IpAddr> = vec![cli.listen.ip()];
    if cli.listen.ip().is_unspecified() {
        ips = vec!["127.0.0.1".parse()?, "::1".parse()?];
    }
    let mut dns = vec!["localhost".to_owned()];
    dns.extend(cli.dns_name.iter().cloned());
    let issued = ca.issue_server(
        &key.csr_pem("console")?,
        &dns,
        &ips,
        Duration::from_secs(30 * 24 * 3600),
    )?;
    let chain = segmesh_identity::ca::certs_from_pem(&issued.chain_pem)?;
    // Client certificates are optional: enforcers renew with theirs.
    let verifier = segmesh_identity::verify::ClientVerifier::optional(
        segmesh_identity::verify::PeerVerifier::new(
            ca.bundle(),
            ca.trust_domain(),
            segmesh_identity::tls::provider(),
        )?,
    );
    let tls = rustls::ServerConfig::builder_with_provider(segmesh_identity::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(
            chain,
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.der().into()),
        )?;
    let kube_config = if let Some(path) = &cli.kubeconfig {
        let kc = kube::config::Kubeconfig::read_from(path)
            .with_context(|| format!("read the kubeconfig {}", path.display()))?;
        Some(
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))?,
        )
    } else if cli.kubernetes_in_cluster {
        Some(kube::Config::incluster().context("the in-cluster Kubernetes configuration")?)
    } else {
        None
    };
    if let Some(cfg) = kube_config {
        let url = cfg.cluster_url.clone();
        segmesh_identity::tls::install_default_provider();
        let client = kube::Client::try_from(cfg).context("the Kubernetes client")?;
        tracing::info!(%url, "following the Kubernetes cluster");
        tokio::spawn(segmesh_control::cluster::follow(
            client,
            console.cluster.clone(),
            *cli.kubernetes_resync,
        ));
    }
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("listen on {}", cli.listen))?;
    tracing::info!(addr = %listener.local_addr()?, ca = %ca_dir.join("bundle.crt").display(), "console API listening");
    let server = tokio::spawn(segmesh_control::server::serve(
        listener,
        Arc::new(tls),
        Arc::new(console),
        Arc::new(ca),
        {
            let d = segmesh_control::inject::Options::default();
            segmesh_control::inject::Options {
                image: cli.inject_image.clone().unwrap_or(d.image),
                console: cli.inject_console_url.clone().unwrap_or(d.console),
                ..d
            }
        },
    ));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.abort();
    Ok(())
}
