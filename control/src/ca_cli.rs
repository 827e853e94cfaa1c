//! `segmeshctl ca`: an offline CA for host mode, labs and tests.

use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use segmesh_identity::ca::{certs_from_pem, save_issued};
use segmesh_identity::cert::summarize;
use segmesh_identity::{Ca, IdentityError, KeyAlgorithm, SpiffeId, WorkloadKey};

/// `ca init`: a new CA in `dir`. With `intermediate`, a root signs an intermediate that
/// signs workloads; the root's key is written to `dir/root.key` to be moved offline.
pub fn init(
    dir: &Path,
    trust_domain: &str,
    intermediate: bool,
    alg: KeyAlgorithm,
) -> Result<String, IdentityError> {
    if dir.join("ca.key").exists() {
        return Err(IdentityError::Io(
            dir.join("ca.key"),
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a CA already exists here; refusing to overwrite it",
            ),
        ));
    }
    let root = Ca::new_root(trust_domain, alg)?;
    let mut out = String::new();
    if intermediate {
        let inter = root.new_intermediate(alg)?;
        inter.save(dir)?;
        root.save_key(&dir.join("root.key"))?;
        std::fs::write(dir.join("root.crt"), root.chain_pem())
            .map_err(|e| IdentityError::Io(dir.join("root.crt"), e))?;
        let _ = writeln!(
            out,
            "wrote {0}/ca.crt and {0}/ca.key (intermediate), {0}/bundle.crt and {0}/root.crt (root)",
            dir.display()
        );
        let _ = writeln!(
            out,
            "move {}/root.key offline: only the intermediate signs workloads",
            dir.display()
        );
    } else {
        root.save(dir)?;
        let _ = writeln!(
            out,
            "wrote {0}/ca.crt, {0}/ca.key (0600), {0}/bundle.crt",
            dir.display()
        );
    }
    let _ = writeln!(out, "trust domain: {trust_domain}");
    Ok(out)
}

/// `ca issue`: a workload key and certificate, written to `<out>.crt`, `<out>.key`,
/// `<out>.bundle.crt`.
pub fn issue(
    dir: &Path,
    namespace: &str,
    name: &str,
    tags: &[String],
    ttl: Duration,
    alg: KeyAlgorithm,
    out: &Path,
) -> Result<String, IdentityError> {
    let ca = Ca::load(dir)?;
    let id = SpiffeId::new(ca.trust_domain(), namespace, name)?;
    let key = WorkloadKey::generate(alg)?;
    let issued = ca.issue(&key.csr_pem(name)?, &id, tags, ttl)?;
    let [crt, keyp, bundle] = save_issued(out, &issued, &key)?;
    Ok(format!(
        "{id}\nwrote {}, {} (0600), {}\n",
        crt.display(),
        keyp.display(),
        bundle.display()
    ))
}

fn when(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `ca inspect`: every certificate in a PEM file.
pub fn inspect(file: &Path) -> Result<String, IdentityError> {
    let pem = std::fs::read_to_string(file).map_err(|e| IdentityError::Io(file.to_owned(), e))?;
    let now = SystemTime::now();
    let mut out = String::new();
    for (i, der) in certs_from_pem(&pem)?.iter().enumerate() {
        let s = summarize(der)?;
        let _ = writeln!(out, "certificate {i}{}", if s.is_ca { " (CA)" } else { "" });
        let _ = writeln!(out, "  subject:    {}", s.subject);
        let _ = writeln!(out, "  issuer:     {}", s.issuer);
        let _ = writeln!(out, "  serial:     {}", s.serial);
        let state = if now < s.not_before {
            "not yet valid".to_owned()
        } else if now > s.not_after {
            "EXPIRED".to_owned()
        } else {
            let left = s.not_after.duration_since(now).unwrap_or_default();
            format!(
                "valid, {} left",
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            )
        };
        let _ = writeln!(
            out,
            "  validity:   {} .. {} ({state})",
            when(s.not_before),
            when(s.not_after)
        );
        match (&s.workload, s.is_ca) {
            (Ok(w), _) => {
                let _ = writeln!(out, "  identity:   {}", w.spiffe_id());
                let _ = writeln!(out, "  namespace:  {}", w.namespace);
                let _ = writeln!(out, "  name:       {}", w.name);
                let _ = writeln!(
                    out,
                    "  tags:       {}",
                    if w.tags.is_empty() {
                        "(none)".to_owned()
                    } else {
                        w.tags.join(" ")
                    }
                );
            }
            (Err(e), false) => {
                let _ = writeln!(out, "  identity:   not a workload certificate: {e}");
            }
            (Err(_), true) => {}
        }
    }
    Ok(out)
}
