//! The certificate authority: a self-signed root, optionally an intermediate that signs
//! so the root key can stay offline, and CSR-based issuance (the workload makes its own
//! key; the CA only ever sees its public key).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CustomExtension,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType, SerialNumber, SignatureAlgorithm,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::spiffe::{SpiffeId, valid_trust_domain};
use crate::{IdentityError, der, tags};

/// Key algorithm of a workload or CA key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyAlgorithm {
    /// ECDSA P-256 with SHA-256: the default.
    EcdsaP256,
    Ed25519,
}

impl KeyAlgorithm {
    fn rcgen(self) -> &'static SignatureAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// What rcgen writes as the tags extension's OID before [`Ca::set_tags_oid`] replaces it
/// (rcgen takes 64-bit arcs only). Random, so it cannot collide with anything else in a
/// certificate.
const PLACEHOLDER_OID: &[u64] = &[2, 25, 0x5e9d_1c3b_7a40_21f7];

/// Default workload certificate lifetime: 1 h.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Longest lifetime [`Ca::issue`] grants.
pub const MAX_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Backdating of `notBefore`, for clocks slightly behind the CA's (at most a tenth of the
/// lifetime, so that short lifetimes keep their renewal point ahead).
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// A workload's private key and its CSR. The key never leaves the workload.
pub struct WorkloadKey {
    key: KeyPair,
}

impl WorkloadKey {
    pub fn generate(alg: KeyAlgorithm) -> Result<Self, IdentityError> {
        Ok(WorkloadKey {
            key: KeyPair::generate_for(alg.rcgen())?,
        })
    }

    pub fn from_pem(pem: &str) -> Result<Self, IdentityError> {
        Ok(WorkloadKey {
            key: KeyPair::from_pem(pem)?,
        })
    }

    /// PKCS#8 PEM.
    pub fn pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// PKCS#8 DER.
    pub fn der(&self) -> Vec<u8> {
        self.key.serialize_der()
    }

    /// A CSR proving possession of the key. Its contents are advisory: the CA decides
    /// the identity and tags.
    pub fn csr_pem(&self, name: &str) -> Result<String, IdentityError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        Ok(params.serialize_request(&self.key)?.pem()?)
    }
}

/// Everything a leaf certificate can say. [`Ca::issue`] fills it from checked inputs;
/// [`Ca::sign_leaf`] signs whatever it is given (tools and tests that need certificates
/// a correct CA would never issue).
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub uri_sans: Vec<String>,
    /// The DER value of the tags extension, if any.
    pub tags_der: Option<Vec<u8>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub common_name: String,
}

/// A certificate and key issued to a workload, as PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, then any intermediate: what the workload presents.
    pub chain_pem: String,
    /// The trust bundle: the root(s).
    pub bundle_pem: String,
}

/// A certificate authority able to sign workload certificates.
pub struct Ca {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate, then its issuers up to (not including) the root.
    chain: Vec<CertificateDer<'static>>,
    /// Trust anchors (roots).
    bundle: Vec<CertificateDer<'static>>,
    key_pem: String,
}

fn ca_params(
    trust_domain: &str,
    cn: &str,
    path_len: Option<u8>,
    life: Duration,
) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name
        .push(DnType::OrganizationName, "segmesh");
    p.distinguished_name
        .push(DnType::CommonName, format!("{cn} {trust_domain}"));
    p.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    p.not_before = OffsetDateTime::from(now - CLOCK_SKEW);
    p.not_after = OffsetDateTime::from(now + life);
    p.serial_number = Some(random_serial());
    p
}

fn random_serial() -> SerialNumber {
    // RFC 5280 §4.1.2.2: positive, at most 20 octets; CA/B BR ask for 64+ random bits.
    let mut bytes = [0u8; 16];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the system RNG works");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

fn pem_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    use rustls_pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| IdentityError::Pem(what.to_owned(), "CERTIFICATE"))?;
    if certs.is_empty() {
        return Err(IdentityError::Pem(what.to_owned(), "CERTIFICATE"));
    }
    Ok(certs)
}

fn to_pem(certs: &[CertificateDer<'_>]) -> String {
    let blocks: Vec<pem::Pem> = certs
        .iter()
        .map(|c| pem::Pem::new("CERTIFICATE", c.to_vec()))
        .collect();
    pem::encode_many_config(
        &blocks,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// Certificates as PEM.
pub fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    to_pem(certs)
}

/// Reads PEM certificates.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    pem_certs(pem, "input")
}

fn write_private(path: &Path, contents: &str) -> Result<(), IdentityError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e| IdentityError::Io(path.to_owned(), e);
    // Write to a temporary file created 0600, then rename: never a moment where the key
    // is readable by others or half written.
    let tmp = path.with_extension("key.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

fn write_public(path: &Path, contents: &str) -> Result<(), IdentityError> {
    fs::write(path, contents).map_err(|e| IdentityError::Io(path.to_owned(), e))
}

fn read(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|e| IdentityError::Io(path.to_owned(), e))
}

impl Ca {
    /// A new self-signed root CA (10 years) that signs workload certificates itself.
    pub fn new_root(trust_domain: &str, alg: KeyAlgorithm) -> Result<Ca, IdentityError> {
        if !valid_trust_domain(trust_domain) {
            return Err(IdentityError::BadSpiffeId {
                id: trust_domain.to_owned(),
                reason: "bad trust domain",
            });
        }
        let key = KeyPair::generate_for(alg.rcgen())?;
        let key_pem = key.serialize_pem();
        let params = ca_params(
            trust_domain,
            "segmesh root CA",
            None,
            Duration::from_secs(10 * 365 * 24 * 3600),
        );
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(params, key),
            chain: vec![cert.der().clone()],
            bundle: vec![cert.der().clone()],
            key_pem,
        })
    }

    /// A new intermediate CA (1 year, path length 0) signed by this CA. The root's key
    /// can then be kept offline.
    pub fn new_intermediate(&self, alg: KeyAlgorithm) -> Result<Ca, IdentityError> {
        let key = KeyPair::generate_for(alg.rcgen())?;
        let key_pem = key.serialize_pem();
        let params = ca_params(
            &self.trust_domain,
            "segmesh intermediate CA",
            Some(0),
            Duration::from_secs(365 * 24 * 3600),
        );
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(
            self.chain
                .iter()
                .filter(|c| !self.bundle.contains(c))
                .cloned(),
        );
        Ok(Ca {
            trust_domain: self.trust_domain.clone(),
            issuer: Issuer::new(params, key),
            chain,
            bundle: self.bundle.clone(),
            key_pem,
        })
    }

    /// Loads a CA from its signing certificate chain, its key and the trust bundle (PEM).
    pub fn from_pem(
        trust_domain: &str,
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
    ) -> Result<Ca, IdentityError> {
        let chain = pem_certs(chain_pem, "CA certificate")?;
        let bundle = pem_certs(bundle_pem, "trust bundle")?;
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_der(&chain[0], key)?;
        let chain = chain
            .into_iter()
            .filter(|c| !bundle.contains(c) || bundle.len() == 1 && c == &bundle[0])
            .collect::<Vec<_>>();
        Ok(Ca {
            trust_domain: trust_domain.to_owned(),
            issuer,
            chain,
            bundle,
            key_pem: key_pem.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust bundle (roots) as PEM.
    pub fn bundle_pem(&self) -> String {
        to_pem(&self.bundle)
    }

    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The signing certificate (first) and any intermediates, as PEM.
    pub fn chain_pem(&self) -> String {
        to_pem(&self.chain)
    }

    /// The CA's private key (PKCS#8 PEM). Handle with care.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Intermediates a leaf must be presented with (the signing certificate unless it is
    /// itself a root in the bundle).
    fn intermediates(&self) -> Vec<CertificateDer<'static>> {
        self.chain
            .iter()
            .filter(|c| !self.bundle.contains(c))
            .cloned()
            .collect()
    }

    /// Issues a workload certificate for `id` with `tags`, valid for `ttl` (at most
    /// [`MAX_TTL`]), to the key in `csr_pem` (whose signature must verify). The CA's
    /// own trust domain is required; nothing of the CSR but its key is used.
    pub fn issue(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        tags: &[String],
        ttl: Duration,
    ) -> Result<Issued, IdentityError> {
        if id.trust_domain != self.trust_domain {
            return Err(IdentityError::WrongTrustDomain {
                expected: self.trust_domain.clone(),
                found: id.trust_domain.clone(),
            });
        }
        let checked = SpiffeId::new(&id.trust_domain, &id.namespace, &id.name)?;
        let now = SystemTime::now();
        let ttl = ttl.min(MAX_TTL);
        let spec = LeafSpec {
            uri_sans: vec![checked.to_string()],
            tags_der: Some(tags::encode(tags)?),
            not_before: now - CLOCK_SKEW.min(ttl / 10),
            not_after: now + ttl,
            common_name: checked.name.clone(),
        };
        self.sign_leaf(csr_pem, &spec)
    }

    /// Issues a server certificate for the console's own API, named by DNS names and IP
    /// addresses (clients check it with ordinary server-name verification).
    pub fn issue_server(
        &self,
        csr_pem: &str,
        dns: &[String],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<Issued, IdentityError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "segmesh");
        p.distinguished_name
            .push(DnType::CommonName, "segmesh console");
        let mut sans = Vec::new();
        for d in dns {
            sans.push(SanType::DnsName(d.as_str().try_into()?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        p.not_before = OffsetDateTime::from(now - CLOCK_SKEW);
        p.not_after = OffsetDateTime::from(now + ttl);
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        let cert = p.signed_by(&csr.public_key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.intermediates());
        Ok(Issued {
            chain_pem: to_pem(&chain),
            bundle_pem: self.bundle_pem(),
        })
    }

    /// Signs a leaf exactly as specified (no checks of the contents). See [`LeafSpec`].
    pub fn sign_leaf(&self, csr_pem: &str, spec: &LeafSpec) -> Result<Issued, IdentityError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| IdentityError::Csr(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "segmesh");
        p.distinguished_name
            .push(DnType::CommonName, spec.common_name.clone());
        p.subject_alt_names = spec
            .uri_sans
            .iter()
            .map(|u| u.as_str().try_into().map(SanType::URI))
            .collect::<Result<_, _>>()?;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = OffsetDateTime::from(spec.not_before);
        p.not_after = OffsetDateTime::from(spec.not_after);
        p.serial_number = Some(random_serial());
        p.use_authority_key_identifier_extension = true;
        if let Some(der) = &spec.tags_der {
            let mut ext = CustomExtension::from_oid_content(PLACEHOLDER_OID, der.clone());
            ext.set_criticality(false);
            p.custom_extensions = vec![ext];
        }
        let cert = p.signed_by(&csr.public_key, &self.issuer)?;
        let cert = if spec.tags_der.is_some() {
            CertificateDer::from(self.set_tags_oid(cert.der())?)
        } else {
            cert.der().clone()
        };
        let mut chain = vec![cert];
        chain.extend(self.intermediates());
        Ok(Issued {
            chain_pem: to_pem(&chain),
            bundle_pem: self.bundle_pem(),
        })
    }

    /// Swaps the placeholder OID for the real tags OID in a certificate rcgen signed, and
    /// signs the result again with the same key and algorithm.
    fn set_tags_oid(&self, cert: &[u8]) -> Result<Vec<u8>, IdentityError> {
        let (node, rest) = der::parse(cert)?;
        let der::Node::Constructed { children, .. } = node else {
            return Err(IdentityError::BadCertificate(
                "certificate is not a SEQUENCE".into(),
            ));
        };
        let [mut tbs, alg, _old_signature] = <[der::Node; 3]>::try_from(children)
            .map_err(|_| IdentityError::BadCertificate("certificate has not 3 parts".into()))?;
        if !rest.is_empty()
            || der::replace(
                &mut tbs,
                0x06,
                &der::oid_2_25(u128::from(PLACEHOLDER_OID[2])),
                &tags::oid_der(),
            ) != 1
        {
            return Err(IdentityError::BadCertificate(
                "placeholder OID not found exactly once".into(),
            ));
        }
        let mut tbs_der = Vec::new();
        der::encode(&tbs, &mut tbs_der);
        let signature = rcgen::SigningKey::sign(self.issuer.key(), &tbs_der)?;
        let mut bits = vec![0u8]; // no unused bits
        bits.extend(signature);
        let mut body = tbs_der;
        der::encode(&alg, &mut body);
        der::encode(
            &der::Node::Primitive {
                tag: 0x03,
                content: bits,
            },
            &mut body,
        );
        let mut out = vec![0x30];
        der::write_len(&mut out, body.len());
        out.extend(body);
        Ok(out)
    }

    /// Writes `dir/ca.crt` (signing certificate and intermediates), `dir/ca.key` (0600)
    /// and `dir/bundle.crt` (the roots).
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        fs::create_dir_all(dir).map_err(|e| IdentityError::Io(dir.to_owned(), e))?;
        write_private(&dir.join("ca.key"), &self.key_pem)?;
        write_public(&dir.join("ca.crt"), &self.chain_pem())?;
        write_public(&dir.join("bundle.crt"), &self.bundle_pem())?;
        write_public(
            &dir.join("trust-domain"),
            &format!("{}\n", self.trust_domain),
        )
    }

    /// Reads what [`save`](Self::save) wrote.
    pub fn load(dir: &Path) -> Result<Ca, IdentityError> {
        let td = read(&dir.join("trust-domain"))?;
        Ca::from_pem(
            td.trim(),
            &read(&dir.join("ca.crt"))?,
            &read(&dir.join("ca.key"))?,
            &read(&dir.join("bundle.crt"))?,
        )
    }

    /// Writes a root's key to a separate place (`path`, 0600): used by `ca init
    /// --intermediate`, where the root key should go offline.
    pub fn save_key(&self, path: &Path) -> Result<(), IdentityError> {
        write_private(path, &self.key_pem)
    }
}

/// Writes an issued identity: `<out>.crt`, `<out>.key` (0600), `<out>.bundle.crt`.
pub fn save_issued(
    out: &Path,
    issued: &Issued,
    key: &WorkloadKey,
) -> Result<[PathBuf; 3], IdentityError> {
    let with = |ext: &str| {
        let mut s = out.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    let (crt, keyp, bundle) = (with(".crt"), with(".key"), with(".bundle.crt"));
    if let Some(parent) = crt.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(|e| IdentityError::Io(parent.to_owned(), e))?;
    }
    write_private(&keyp, &key.pem())?;
    write_public(&crt, &issued.chain_pem)?;
    write_public(&bundle, &issued.bundle_pem)?;
    Ok([crt, keyp, bundle])
}
