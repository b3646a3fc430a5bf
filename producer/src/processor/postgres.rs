//! The Processor's PostgreSQL store (`DATABASE_URL`): the contract for real.
//!
//! One transaction per batch, answered 2xx only after `COMMIT`. Records are inserted by
//! `record_id` with `ON CONFLICT DO NOTHING` (in record id order, so that two replicas storing
//! the same batch wait on each other instead of deadlocking), then the batch is compared with
//! what the table holds: a record id already stored with another key, aggregation, amendment,
//! amount or window is refused by name and logged in `refused_records`, never overwritten.
//! Amounts go in as the record's decimal text cast to `NUMERIC`. The schema is migrated at start
//! by `refinery` under a PostgreSQL advisory lock (replicas starting together take turns).
//! No TLS: connect over a private network (`sslmode=disable` or the default `prefer`).

use std::sync::LazyLock;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use super::Record;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The password the deploy manifests ship with: a Processor given it refuses to start.
pub const PLACEHOLDER: &str = "REPLACE_ME";

/// Held while migrating (any constant: "pulse" in ASCII).
const MIGRATION_LOCK: i64 = 0x0070_756c_7365;

/// Why a batch could not be stored: retryable (the ingestor keeps the records and tries again).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// What became of a batch (committed).
#[derive(Debug, Default)]
pub struct Stored {
    /// Records stored for the first time.
    pub inserted: u64,
    /// Records already held with the same values (a re-delivery): nothing changed.
    pub duplicates: u64,
    /// Records refused: (record_id, reason). Not stored.
    pub refused: Vec<(String, String)>,
}

/// The connection pool.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    config: tokio_postgres::Config,
}

impl PgStore {
    /// A pool on `url` (a `postgres://` URL or `key=value` string); connects lazily. Refuses
    /// the deploy manifests' placeholder password.
    pub fn new(url: &str, max_connections: usize) -> anyhow::Result<Self> {
        if url.contains(PLACEHOLDER) {
            anyhow::bail!(
                "DATABASE_URL holds the placeholder {PLACEHOLDER}: put the real password in the Secret"
            );
        }
        let mut config: tokio_postgres::Config = url.parse()?;
        config.connect_timeout(Duration::from_secs(5));
        if config.get_application_name().is_none() {
            config.application_name("pulse-processor");
        }
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()?;
        Ok(PgStore { pool, config })
    }

    /// Brings the schema up to date (refinery), one replica at a time.
    pub async fn migrate(&self) -> anyhow::Result<()> {
        let (mut client, conn) = self.config.connect(NoTls).await?;
        let task = tokio::spawn(conn);
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
            .await?;
        let report = embedded::migrations::runner().run_async(&mut client).await;
        // The lock also goes with the connection; released here so the next replica goes on.
        let _ = client
            .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
            .await;
        drop(client);
        let _ = task.await;
        for m in report?.applied_migrations() {
            tracing::info!(migration = %m, "applied");
        }
        Ok(())
    }

    /// Whether the database answers (readiness).
    pub async fn ready(&self) -> bool {
        let check = async {
            let client = self.pool.get().await.ok()?;
            client.simple_query("SELECT 1").await.ok()
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), check).await,
            Ok(Some(_))
        )
    }

    /// Stores a batch in one transaction, held open `hold` before `COMMIT` (a test fault).
    pub async fn store(
        &self,
        records: &[Record],
        hold: Option<Duration>,
    ) -> Result<Stored, StoreError> {
        let rows = Rows::of(records);
        let params = rows.params();
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let inserted = tx.execute(INSERT.as_str(), &params).await?;
        let conflicts = tx.query(CONFLICTS.as_str(), &params).await?;
        let mut stored = Stored {
            inserted,
            ..Stored::default()
        };
        for row in conflicts {
            let (id, reason): (String, String) = (row.get(0), row.get(1));
            let offered = records
                .iter()
                .find(|r| r.record_id == id)
                .and_then(|r| serde_json::to_string(r).ok())
                .unwrap_or_default();
            tx.execute(
                "INSERT INTO refused_records (record_id, reason, offered) VALUES ($1, $2, $3)",
                &[&id, &reason, &offered],
            )
            .await?;
            stored.refused.push((id, reason));
        }
        if let Some(d) = hold {
            tokio::time::sleep(d).await;
        }
        tx.commit().await?;
        stored.duplicates = (records.len() as u64)
            .saturating_sub(inserted)
            .saturating_sub(stored.refused.len() as u64);
        Ok(stored)
    }

    /// A tenant's usage over a billing period (`billing_usage`): per (sku, unit, aggregation)
    /// the exact amount as text, with the number of windows and records.
    pub async fn usage(
        &self,
        tenant: &str,
        from: &str,
        to: &str,
        tz: &str,
    ) -> Result<Vec<PeriodUsage>, StoreError> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT product_sku, use_unit, aggregation, trim_scale(used_amount)::text, \
                        windows, records \
                 FROM billing_usage($1, $2::text::date, $3::text::date, $4)",
                &[&tenant, &from, &to, &tz],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| PeriodUsage {
                product_sku: r.get(0),
                use_unit: r.get(1),
                aggregation: r.get(2),
                used_amount: r.get(3),
                windows: r.get(4),
                records: r.get(5),
            })
            .collect())
    }

    /// Every window's usage (`window_usage`) and every key's over all windows, per
    /// aggregation, as text: what `pulse-producer verify --database-url` compares.
    pub async fn owed(&self) -> Result<Owed, StoreError> {
        let client = self.pool.get().await?;
        let read = |rows: Vec<tokio_postgres::Row>| -> Vec<OwedRow> {
            rows.iter()
                .map(|r| OwedRow {
                    tenant_id: r.get(0),
                    product_sku: r.get(1),
                    use_unit: r.get(2),
                    aggregation: r.get(3),
                    window_start: r.get(4),
                    used_amount: r.get(5),
                })
                .collect()
        };
        let windows = client.query(PER_WINDOW, &[]).await?;
        let keys = client.query(PER_KEY, &[]).await?;
        Ok(Owed {
            windows: read(windows),
            keys: read(keys),
        })
    }
}

/// One line of a billing period.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeriodUsage {
    pub product_sku: String,
    pub use_unit: String,
    pub aggregation: String,
    /// Exact decimal text.
    pub used_amount: String,
    pub windows: i64,
    pub records: i64,
}

/// What the database says is owed.
#[derive(Debug, Default)]
pub struct Owed {
    /// Per window, key and aggregation.
    pub windows: Vec<OwedRow>,
    /// Per key and aggregation over all windows (`window_start` 0).
    pub keys: Vec<OwedRow>,
}

#[derive(Debug, Clone)]
pub struct OwedRow {
    pub tenant_id: String,
    pub product_sku: String,
    pub use_unit: String,
    pub aggregation: String,
    /// Unix seconds.
    pub window_start: i64,
    /// Exact decimal text.
    pub used_amount: String,
}

const PER_WINDOW: &str = "SELECT tenant_id, product_sku, use_unit, aggregation, \
    extract(epoch FROM window_start)::bigint, trim_scale(used_amount)::text FROM window_usage";

const PER_KEY: &str = "SELECT tenant_id, product_sku, use_unit, aggregation, 0::bigint, \
    trim_scale(CASE aggregation \
        WHEN 'max' THEN max(used_amount) WHEN 'min' THEN min(used_amount) \
        WHEN 'latest' THEN (array_agg(used_amount \
            ORDER BY latest_at DESC NULLS LAST, window_start DESC))[1] \
        ELSE sum(used_amount) END)::text \
    FROM window_usage GROUP BY 1, 2, 3, 4";

/// The batch as columns, in record id order: one array parameter per column.
struct Rows {
    ids: Vec<String>,
    tenants: Vec<String>,
    skus: Vec<String>,
    units: Vec<String>,
    aggregations: Vec<String>,
    amounts: Vec<String>,
    starts: Vec<String>,
    ends: Vec<String>,
    amends: Vec<i32>,
    latest: Vec<Option<String>>,
    finals: Vec<Option<String>>,
}

impl Rows {
    fn of(records: &[Record]) -> Self {
        let mut sorted: Vec<&Record> = records.iter().collect();
        sorted.sort_by(|a, b| a.record_id.cmp(&b.record_id));
        let col = |f: fn(&Record) -> String| sorted.iter().map(|r| f(r)).collect();
        Rows {
            ids: col(|r| r.record_id.clone()),
            tenants: col(|r| r.tenant_id.clone()),
            skus: col(|r| r.product_sku.clone()),
            units: col(|r| r.use_unit.clone()),
            aggregations: col(|r| super::combine::aggregation_of(r.aggregation.as_deref()).into()),
            amounts: col(|r| {
                r.used_amount_text
                    .clone()
                    .unwrap_or_else(|| crate::money::canonical(&r.used_amount))
            }),
            starts: col(|r| r.window_start.clone()),
            ends: col(|r| r.window_end.clone()),
            amends: sorted
                .iter()
                .map(|r| r.amends.unwrap_or(0) as i32)
                .collect(),
            latest: sorted.iter().map(|r| r.latest_at.clone()).collect(),
            finals: sorted.iter().map(|r| r.final_at.clone()).collect(),
        }
    }

    fn params(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        vec![
            &self.ids,
            &self.tenants,
            &self.skus,
            &self.units,
            &self.aggregations,
            &self.amounts,
            &self.starts,
            &self.ends,
            &self.amends,
            &self.latest,
            &self.finals,
        ]
    }
}

/// The batch as a relation (text cast in SQL, so no type mapping is needed on this side).
const BATCH: &str = "unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
    $6::text[], $7::text[], $8::text[], $9::int4[], $10::text[], $11::text[]) \
    AS b(record_id, tenant_id, product_sku, use_unit, aggregation, used_amount, \
         window_start, window_end, amends, latest_at, final_at)";

static INSERT: LazyLock<String> = LazyLock::new(|| {
    [
        "INSERT INTO usage_records (record_id, tenant_id, product_sku, use_unit, aggregation, \
        used_amount, window_start, window_end, amends, latest_at, final_at) \
     SELECT record_id, tenant_id, product_sku, use_unit, aggregation, used_amount::numeric, \
        window_start::timestamptz, window_end::timestamptz, amends, latest_at::timestamptz, \
        final_at::timestamptz FROM ",
        BATCH,
        " ORDER BY record_id ON CONFLICT (record_id) DO NOTHING",
    ]
    .concat()
});

/// The batch's records whose id is held with other values, and how they differ.
static CONFLICTS: LazyLock<String> = LazyLock::new(|| {
    [
        "SELECT b.record_id, 'record_id already stored with other values: ' || concat_ws('; ', \
        CASE WHEN (r.tenant_id, r.product_sku, r.use_unit) \
                  IS DISTINCT FROM (b.tenant_id, b.product_sku, b.use_unit) \
             THEN 'another key' END, \
        CASE WHEN r.aggregation <> b.aggregation \
             THEN format('aggregation %s, stored %s', b.aggregation, r.aggregation) END, \
        CASE WHEN r.amends <> b.amends \
             THEN format('amends %s, stored %s', b.amends, r.amends) END, \
        CASE WHEN r.used_amount <> b.used_amount::numeric \
             THEN format('used_amount %s, stored %s', b.used_amount, r.used_amount) END, \
        CASE WHEN r.window_start <> b.window_start::timestamptz \
               OR r.window_end <> b.window_end::timestamptz \
             THEN format('window %s..%s, stored %s..%s', b.window_start, b.window_end, \
                         r.window_start, r.window_end) END) \
     FROM ",
        BATCH,
        " JOIN usage_records r USING (record_id) \
     WHERE (r.tenant_id, r.product_sku, r.use_unit, r.aggregation, r.amends) \
               IS DISTINCT FROM (b.tenant_id, b.product_sku, b.use_unit, b.aggregation, b.amends) \
        OR r.used_amount <> b.used_amount::numeric \
        OR r.window_start <> b.window_start::timestamptz \
        OR r.window_end <> b.window_end::timestamptz",
    ]
    .concat()
});

/// Why a record cannot be stored whatever the table holds (refused by name, not retried): an
/// aggregation this store does not know, a negative amount, a time that is not RFC 3339.
pub fn invalid(r: &Record) -> Option<String> {
    let agg = super::combine::aggregation_of(r.aggregation.as_deref());
    if !matches!(agg, "sum" | "count" | "max" | "min" | "latest") {
        return Some(format!("unknown aggregation {agg:?}"));
    }
    if r.used_amount < crate::money::Dec::default() {
        return Some("negative used_amount".into());
    }
    if r.amends.is_some_and(|n| n > i32::MAX as u32) {
        return Some("amends out of range".into());
    }
    let times = [
        ("window_start", Some(&r.window_start)),
        ("window_end", Some(&r.window_end)),
        ("latest_at", r.latest_at.as_ref()),
        ("final_at", r.final_at.as_ref()),
    ];
    times.into_iter().find_map(|(name, t)| {
        let t = t?;
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
            .is_err()
            .then(|| format!("{name} is not an RFC 3339 time: {t:?}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(json: &str) -> Record {
        let base = r#"{"record_id":"r","tenant_id":"t","product_sku":"s","use_unit":"u",
            "used_amount":1,"window_start":"2026-01-01T10:00:00Z",
            "window_end":"2026-01-01T11:00:00Z""#;
        serde_json::from_str(&format!("{base}{json}}}")).unwrap()
    }

    #[test]
    fn only_records_the_schema_can_hold_are_stored() {
        assert_eq!(invalid(&record("")), None, "no aggregation is a sum");
        assert_eq!(
            invalid(&record(
                r#","aggregation":"latest","latest_at":"2026-01-01T10:59:59.250Z","final_at":"2026-01-02T11:00:00+02:00""#
            )),
            None,
            "any RFC 3339 offset"
        );
        let why = |extra: &str| invalid(&record(extra)).unwrap_or_default();
        assert!(why(r#","aggregation":"average""#).contains("unknown aggregation"));
        assert!(why(r#","final_at":"tomorrow""#).contains("final_at"));
        assert!(why(r#","latest_at":"2026-01-01 10:00""#).contains("latest_at"));
    }

    #[test]
    fn the_placeholder_password_is_refused() {
        let err = PgStore::new("postgres://p:REPLACE_ME@db/usage", 1)
            .err()
            .unwrap();
        assert!(err.to_string().contains("REPLACE_ME"), "{err}");
    }
}
