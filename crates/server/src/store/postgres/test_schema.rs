//! [`TestSchema`]: a PostgreSQL schema of its own for each test.

use uuid::Uuid;

use super::super::StoreResult;

/// A PostgreSQL schema of its own, for one test: created empty, dropped on drop. Tests that
/// share a database (nextest runs them in parallel) each get one, so they never collide.
pub struct TestSchema {
    base_url: String,
    name: String,
    /// The URL that selects this schema (`options[search_path]=…`, and names its connections
    /// after it: `application_name=…`), for a store or a
    /// `natter serve --database-url`.
    pub url: String,
}

impl TestSchema {
    /// A fresh schema in the database at `NATTER_TEST_DATABASE_URL`; when that is not set,
    /// prints a loud SKIPPED line naming `test` and returns None (in CI: fails, see
    /// [`crate::testenv`]).
    pub async fn from_env(test: &str) -> Option<TestSchema> {
        let url = crate::testenv::service_url("NATTER_TEST_DATABASE_URL", test, "PostgreSQL")?;
        Some(TestSchema::create(&url).await.expect("a schema in NATTER_TEST_DATABASE_URL"))
    }

    /// Creates `natter_test_<uuid>` in the database at `base_url`.
    pub async fn create(base_url: &str) -> StoreResult<TestSchema> {
        let name = format!("natter_test_{}", Uuid::new_v4().simple());
        let mut conn: sqlx::PgConnection = sqlx::Connection::connect(base_url).await?;
        sqlx::query(&format!("CREATE SCHEMA {name}")).execute(&mut conn).await?;
        sqlx::Connection::close(conn).await?;
        let sep = if base_url.contains('?') { '&' } else { '?' };
        Ok(TestSchema {
            url: format!("{base_url}{sep}options[search_path]={name}&application_name={name}"),
            base_url: base_url.to_owned(),
            name,
        })
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (url, name) = (self.base_url.clone(), self.name.clone());
        // On a thread with a runtime of its own: the test's runtime may be the one being
        // dropped. The test's own connections (named after the schema) are ended first, so
        // that a transaction they left open cannot make the DROP wait.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await else { return };
                let _ =
                    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
                        .bind(&name)
                        .execute(&mut conn)
                        .await;
                let _ = sqlx::query("SET lock_timeout = '10s'").execute(&mut conn).await;
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).execute(&mut conn).await;
            })
        })
        .join();
    }
}
