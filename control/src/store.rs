//! The console's storage: the draft, the published versions, API tokens and the audit
//! log, behind a trait with two backends that pass the same contract tests: one redb file
//! ([`RedbStore`], one console on one machine) and etcd ([`EtcdStore`], several console
//! replicas on one etcd cluster). Every mutation is one transaction, together with its
//! audit entry: it happens whole or not at all.

mod etcd;
pub use etcd::{EtcdOptions, EtcdStore, EtcdTls};

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use segmesh_policy::{ExternalNetwork, Namespace, NetworkPolicy};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Backend(#[from] redb::Error),
    #[error("stored data is unreadable: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("there is no draft to commit")]
    NoDraft,
    #[error("version {0} does not exist")]
    NoSuchVersion(u64),
    #[error(
        "the draft changed since this edit read it (another apply, delete, commit or rollback, on this console or another replica)"
    )]
    Conflict,
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("etcd unavailable: {0}")]
    EtcdUnavailable(String),
    #[error(
        "too large for etcd ({0}): etcd takes at most its --max-request-bytes in one request (1.5 MiB by default)"
    )]
    TooLarge(String),
}

/// What an edit of the draft started from: a change to the draft or to the live version
/// since then makes [`Store::set_draft`] refuse the edit with [`StoreError::Conflict`]
/// (two editors, perhaps on two replicas, cannot overwrite each other's changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DraftStamp(pub u64);

impl From<redb::DatabaseError> for StoreError {
    fn from(e: redb::DatabaseError) -> Self {
        StoreError::Backend(e.into())
    }
}
impl From<redb::TransactionError> for StoreError {
    fn from(e: redb::TransactionError) -> Self {
        StoreError::Backend(e.into())
    }
}
impl From<redb::TableError> for StoreError {
    fn from(e: redb::TableError) -> Self {
        StoreError::Backend(e.into())
    }
}
impl From<redb::StorageError> for StoreError {
    fn from(e: redb::StorageError) -> Self {
        StoreError::Backend(e.into())
    }
}
impl From<redb::CommitError> for StoreError {
    fn from(e: redb::CommitError) -> Self {
        StoreError::Backend(e.into())
    }
}

/// The documents of one state (a draft or a version), keyed `kind/namespace/name`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Documents {
    pub policies: BTreeMap<String, NetworkPolicy>,
    pub externals: BTreeMap<String, ExternalNetwork>,
    pub namespaces: BTreeMap<String, Namespace>,
    /// (Stores written before Services existed have none.)
    #[serde(default)]
    pub services: BTreeMap<String, segmesh_policy::Service>,
}

/// A published version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    pub version: u64,
    pub committed_at: String,
    pub by: String,
    /// `commit`, or `rollback to N`.
    pub how: String,
    pub documents: Documents,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Editor,
    /// A bootstrap token: enforcers register PUs with it, in its namespace subtree, with
    /// at most the tags it allows.
    Enforcer,
}

/// A processing unit as the console recorded it at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PuRecord {
    pub name: String,
    pub namespace: String,
    /// The tags the console certifies (automatic ones included).
    pub tags: Vec<String>,
    pub ips: Vec<std::net::IpAddr>,
    pub registered_at: String,
    /// The bootstrap token's name.
    pub by: String,
    /// Registered with a token that allows any source address (NAT): its renewals may
    /// come from an address it does not claim too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any_source: bool,
}

/// An API token's rights (the token itself is stored only as a SHA-256 hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    pub role: Role,
    /// The namespace subtree the role applies to.
    pub namespace: String,
    /// For `Enforcer` tokens: the tag patterns (`key=value`, `key=*`) a registering PU
    /// may receive.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_tags: Vec<String>,
    /// For `Enforcer` tokens: a PU may register from an address it does not claim
    /// (behind NAT). Off by default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub any_source: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub time: String,
    /// The token's name.
    pub who: String,
    pub action: String,
    pub detail: String,
}

/// What the console keeps.
pub trait Store: Send + Sync {
    fn draft(&self) -> Result<Option<Documents>, StoreError>;
    /// What an edit starts from: the draft, or the live version's documents when there
    /// is none (empty before the first commit), and the stamp to hand to
    /// [`Store::set_draft`].
    fn draft_base(&self) -> Result<(Documents, DraftStamp), StoreError>;
    /// Replaces the draft, recording `audit` in the same transaction, unless the draft or
    /// the live version changed since `since` was taken ([`StoreError::Conflict`]).
    fn set_draft(
        &self,
        docs: &Documents,
        since: DraftStamp,
        audit: (&str, &str, &str),
    ) -> Result<(), StoreError>;
    /// Publishes the draft as the next version and clears it.
    fn commit(&self, audit: (&str, &str, &str)) -> Result<u64, StoreError>;
    /// Publishes the documents of version `to` as the next version.
    fn rollback(&self, to: u64, audit: (&str, &str, &str)) -> Result<u64, StoreError>;
    fn live(&self) -> Result<Option<Version>, StoreError>;
    fn version(&self, v: u64) -> Result<Option<Version>, StoreError>;
    fn put_token(
        &self,
        hash: &str,
        token: &TokenRecord,
        audit: (&str, &str, &str),
    ) -> Result<(), StoreError>;
    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Every token, by hash.
    fn tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError>;
    /// Removes a token; false if there was none.
    fn delete_token(&self, hash: &str, audit: (&str, &str, &str)) -> Result<bool, StoreError>;
    fn audit_log(&self) -> Result<Vec<AuditEntry>, StoreError>;
    /// Records (or replaces) a PU.
    fn put_pu(&self, pu: &PuRecord, audit: (&str, &str, &str)) -> Result<(), StoreError>;
    fn pus(&self) -> Result<Vec<PuRecord>, StoreError>;
    /// One PU, if registered.
    fn pu(&self, namespace: &str, name: &str) -> Result<Option<PuRecord>, StoreError>;
    /// Removes a PU; false if there was none.
    fn delete_pu(
        &self,
        namespace: &str,
        name: &str,
        audit: (&str, &str, &str),
    ) -> Result<bool, StoreError>;
    /// Bumped by every change an enforcer may need (commit, rollback, a registration
    /// that changes the registry, a PU deleted).
    fn revision(&self) -> Result<u64, StoreError>;
    /// Appends flow records reported by an enforcer, keeping at most `keep` records in
    /// all and `per_reporter` of any one reporter (the oldest go first), so that one
    /// reporter cannot evict everyone's records.
    fn add_flows(
        &self,
        flows: &[StoredFlow],
        keep: usize,
        per_reporter: usize,
    ) -> Result<(), StoreError>;
    /// The stored flow records, oldest first.
    fn flows(&self) -> Result<Vec<StoredFlow>, StoreError>;
    /// Renews PU `namespace:name`'s lease for `ttl` in the store, where the store keeps
    /// leases (etcd: replicas share them). The embedded store keeps none: one console's
    /// memory is the lease table.
    fn renew_lease(&self, _namespace: &str, _name: &str, _ttl: Duration) -> Result<(), StoreError> {
        Ok(())
    }
    /// The PUs (`<namespace>:<name>`) whose lease in the store runs; `None` where the
    /// store keeps no leases.
    fn leases(&self) -> Result<Option<HashSet<String>>, StoreError> {
        Ok(None)
    }
    /// Follows the revision as other console replicas move it (etcd's watch); `None`
    /// where this console is the only writer.
    fn follow_revision(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// A flow record as the console keeps it: which enforcer reported it, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredFlow {
    /// Its place in the store (set when read; cursors of paged queries).
    #[serde(default)]
    pub seq: u64,
    /// `<namespace>:<name>` of the reporting enforcer's PU.
    pub reporter: String,
    pub received_at: String,
    pub record: segmesh_api::FlowRecord,
}

fn read_counter(
    meta: &impl redb::ReadableTable<&'static str, &'static [u8]>,
    name: &str,
) -> Result<u64, StoreError> {
    Ok(meta.get(name)?.map_or(0, |v| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v.value()[..8]);
        u64::from_be_bytes(b)
    }))
}

/// Adds one to the counter `name` inside a write transaction.
fn count_up(txn: &redb::WriteTransaction, name: &str) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    let current = read_counter(&meta, name)?;
    meta.insert(name, (current + 1).to_be_bytes().as_slice())?;
    Ok(())
}

/// Adds one to the revision inside a write transaction.
fn bump(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    count_up(txn, "revision")
}

/// Marks a change of the draft or of the live version (what draft stamps compare).
fn draft_moved(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    count_up(txn, "draft-stamp")
}

const META: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");
const VERSIONS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("versions");
const TOKENS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("tokens");
const AUDIT: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("audit");
const PUS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("pus");
const FLOWS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("flows");
/// Each stored flow under its reporter, for the per-reporter bound.
const FLOWS_BY_REPORTER: redb::TableDefinition<(&str, u64), ()> =
    redb::TableDefinition::new("flows_by_reporter");

/// The embedded store: one redb file.
pub struct RedbStore {
    db: redb::Database,
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn append_audit(
    txn: &redb::WriteTransaction,
    (who, action, detail): (&str, &str, &str),
) -> Result<(), StoreError> {
    use redb::ReadableTable;
    let mut t = txn.open_table(AUDIT)?;
    let seq = t.last()?.map_or(1, |(k, _)| k.value() + 1);
    let e = AuditEntry {
        seq,
        time: now(),
        who: who.into(),
        action: action.into(),
        detail: detail.into(),
    };
    t.insert(seq, serde_json::to_vec(&e)?.as_slice())?;
    Ok(())
}

fn publish(
    txn: &redb::WriteTransaction,
    docs: Documents,
    by: &str,
    how: String,
) -> Result<u64, StoreError> {
    use redb::ReadableTable;
    let mut t = txn.open_table(VERSIONS)?;
    let next = t.last()?.map_or(1, |(k, _)| k.value() + 1);
    let v = Version {
        version: next,
        committed_at: now(),
        by: by.into(),
        how,
        documents: docs,
    };
    t.insert(next, serde_json::to_vec(&v)?.as_slice())?;
    Ok(next)
}

impl RedbStore {
    /// Opens (or creates) `dir/console.redb`.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Backend(redb::Error::Io(e)))?;
        let db = redb::Database::create(dir.join("console.redb"))?;
        let txn = db.begin_write()?;
        txn.open_table(META)?;
        txn.open_table(VERSIONS)?;
        txn.open_table(TOKENS)?;
        txn.open_table(AUDIT)?;
        txn.open_table(PUS)?;
        txn.open_table(FLOWS)?;
        txn.open_table(FLOWS_BY_REPORTER)?;
        txn.commit()?;
        Ok(RedbStore { db })
    }

    fn read_json<T: for<'de> Deserialize<'de>>(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(table)?;
        Ok(match t.get(key)? {
            Some(v) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }
}

impl Store for RedbStore {
    fn draft(&self) -> Result<Option<Documents>, StoreError> {
        self.read_json(META, "draft")
    }

    fn draft_base(&self) -> Result<(Documents, DraftStamp), StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let stamp = DraftStamp(read_counter(&meta, "draft-stamp")?);
        if let Some(d) = meta.get("draft")? {
            return Ok((serde_json::from_slice(d.value())?, stamp));
        }
        let versions = txn.open_table(VERSIONS)?;
        let docs = match versions.last()? {
            Some((_, v)) => serde_json::from_slice::<Version>(v.value())?.documents,
            None => Documents::default(),
        };
        Ok((docs, stamp))
    }

    fn set_draft(
        &self,
        docs: &Documents,
        since: DraftStamp,
        audit: (&str, &str, &str),
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        if read_counter(&txn.open_table(META)?, "draft-stamp")? != since.0 {
            return Err(StoreError::Conflict);
        }
        txn.open_table(META)?
            .insert("draft", serde_json::to_vec(docs)?.as_slice())?;
        draft_moved(&txn)?;
        append_audit(&txn, audit)?;
        txn.commit()?;
        Ok(())
    }

    fn commit(&self, audit: (&str, &str, &str)) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let draft: Documents = {
            let mut meta = txn.open_table(META)?;
            let Some(d) = meta.remove("draft")? else {
                return Err(StoreError::NoDraft);
            };
            serde_json::from_slice(d.value())?
        };
        let v = publish(&txn, draft, audit.0, "commit".into())?;
        bump(&txn)?;
        draft_moved(&txn)?;
        append_audit(&txn, audit)?;
        txn.commit()?;
        Ok(v)
    }

    fn rollback(&self, to: u64, audit: (&str, &str, &str)) -> Result<u64, StoreError> {
        let txn = self.db.begin_write()?;
        let docs: Documents = {
            use redb::ReadableTable;
            let t = txn.open_table(VERSIONS)?;
            let v = t.get(to)?.ok_or(StoreError::NoSuchVersion(to))?;
            let v: Version = serde_json::from_slice(v.value())?;
            v.documents
        };
        let v = publish(&txn, docs, audit.0, format!("rollback to {to}"))?;
        bump(&txn)?;
        draft_moved(&txn)?;
        append_audit(&txn, audit)?;
        txn.commit()?;
        Ok(v)
    }

    fn live(&self) -> Result<Option<Version>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read()?;
        let t = txn.open_table(VERSIONS)?;
        Ok(match t.last()? {
            Some((_, v)) => Some(serde_json::from_slice(v.value())?),
            None => None,
        })
    }

    fn version(&self, v: u64) -> Result<Option<Version>, StoreError> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read()?;
        let t = txn.open_table(VERSIONS)?;
        Ok(match t.get(v)? {
            Some(x) => Some(serde_json::from_slice(x.value())?),
            None => None,
        })
    }

    fn put_token(
        &self,
        hash: &str,
        token: &TokenRecord,
        audit: (&str, &str, &str),
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        txn.open_table(TOKENS)?
            .insert(hash, serde_json::to_vec(token)?.as_slice())?;
        append_audit(&txn, audit)?;
        txn.commit()?;
        Ok(())
    }

    fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read_json(TOKENS, hash)
    }

    fn tokens(&self) -> Result<Vec<(String, TokenRecord)>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read()?;
        let t = txn.open_table(TOKENS)?;
        t.iter()?
            .map(|r| {
                let (k, v) = r?;
                Ok((k.value().to_owned(), serde_json::from_slice(v.value())?))
            })
            .collect()
    }

    fn delete_token(&self, hash: &str, audit: (&str, &str, &str)) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let gone = txn.open_table(TOKENS)?.remove(hash)?.is_some();
        if gone {
            append_audit(&txn, audit)?;
        }
        txn.commit()?;
        Ok(gone)
    }

    fn put_pu(&self, pu: &PuRecord, audit: (&str, &str, &str)) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        let key = format!("{}:{}", pu.namespace, pu.name);
        let old = txn
            .open_table(PUS)?
            .insert(key.as_str(), serde_json::to_vec(pu)?.as_slice())?
            .map(|v| serde_json::from_slice::<PuRecord>(v.value()))
            .transpose()?;
        // Enforcers see PUs through the registry (names and addresses) and the Services
        // whose selectors pick them (tags): a renewal that changes none is no news.
        if old.is_none_or(|o| o.ips != pu.ips || o.tags != pu.tags) {
            bump(&txn)?;
        }
        append_audit(&txn, audit)?;
        txn.commit()?;
        Ok(())
    }

    fn pu(&self, namespace: &str, name: &str) -> Result<Option<PuRecord>, StoreError> {
        self.read_json(PUS, &format!("{namespace}:{name}"))
    }

    fn delete_pu(
        &self,
        namespace: &str,
        name: &str,
        audit: (&str, &str, &str),
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let key = format!("{namespace}:{name}");
        let gone = txn.open_table(PUS)?.remove(key.as_str())?.is_some();
        if gone {
            bump(&txn)?;
            append_audit(&txn, audit)?;
        }
        txn.commit()?;
        Ok(gone)
    }

    fn add_flows(
        &self,
        flows: &[StoredFlow],
        keep: usize,
        per_reporter: usize,
    ) -> Result<(), StoreError> {
        use redb::{ReadableTable, ReadableTableMetadata};
        let txn = self.db.begin_write()?;
        {
            let mut t = txn.open_table(FLOWS)?;
            let mut by = txn.open_table(FLOWS_BY_REPORTER)?;
            let first = t.last()?.map_or(1, |(k, _)| k.value() + 1);
            for (seq, f) in (first..).zip(flows) {
                t.insert(seq, serde_json::to_vec(f)?.as_slice())?;
                by.insert((f.reporter.as_str(), seq), ())?;
            }
            // This reporter's oldest beyond its share.
            let mut reporters: Vec<&str> = flows.iter().map(|f| f.reporter.as_str()).collect();
            reporters.sort_unstable();
            reporters.dedup();
            for r in reporters {
                let mine: Vec<u64> = by
                    .range((r, 0)..=(r, u64::MAX))?
                    .map(|e| e.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()?;
                for seq in mine.iter().take(mine.len().saturating_sub(per_reporter)) {
                    t.remove(*seq)?;
                    by.remove((r, *seq))?;
                }
            }
            // Everyone's oldest beyond the total.
            let excess = t.len()?.saturating_sub(keep as u64);
            let oldest: Vec<(u64, String)> = t
                .iter()?
                .take(excess as usize)
                .map(|e| {
                    let (k, v) = e?;
                    let f: StoredFlow = serde_json::from_slice(v.value())?;
                    Ok::<_, StoreError>((k.value(), f.reporter))
                })
                .collect::<Result<_, _>>()?;
            for (seq, reporter) in oldest {
                t.remove(seq)?;
                by.remove((reporter.as_str(), seq))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn flows(&self) -> Result<Vec<StoredFlow>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read()?;
        let t = txn.open_table(FLOWS)?;
        t.iter()?
            .map(|r| {
                let (k, v) = r?;
                let mut f: StoredFlow = serde_json::from_slice(v.value())?;
                f.seq = k.value();
                Ok(f)
            })
            .collect()
    }

    fn revision(&self) -> Result<u64, StoreError> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read()?;
        read_counter(&txn.open_table(META)?, "revision")
    }

    fn pus(&self) -> Result<Vec<PuRecord>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read()?;
        let t = txn.open_table(PUS)?;
        t.iter()?
            .map(|r| {
                let (_, v) = r?;
                Ok(serde_json::from_slice(v.value())?)
            })
            .collect()
    }

    fn audit_log(&self) -> Result<Vec<AuditEntry>, StoreError> {
        use redb::{ReadableDatabase, ReadableTable};
        let txn = self.db.begin_read()?;
        let t = txn.open_table(AUDIT)?;
        t.iter()?
            .map(|r| {
                let (_, v) = r?;
                Ok(serde_json::from_slice(v.value())?)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests;
