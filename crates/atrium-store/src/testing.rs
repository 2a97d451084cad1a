//! Fresh databases for tests, one per test, on either backend.
//!
//! PostgreSQL tests need a real server: `scripts/postgres.sh` starts one and
//! prints the URL to export as `ATRIUM_TEST_POSTGRES_URL`. Without it the
//! tests fail with that instruction rather than silently skip.

use rand::Rng;
use sqlx::Connection;

/// The environment variable naming the PostgreSQL server for tests.
pub const POSTGRES_URL_ENV: &str = "ATRIUM_TEST_POSTGRES_URL";

/// Both backends, for suites that must pass on each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestBackend {
    Sqlite,
    Postgres,
}

pub const BOTH: [TestBackend; 2] = [TestBackend::Sqlite, TestBackend::Postgres];

/// A URL to a new, empty database on `backend`. SQLite files go in `dir`.
pub async fn fresh_database_url(backend: TestBackend, dir: &std::path::Path) -> String {
    let suffix: u64 = rand::thread_rng().gen();
    match backend {
        TestBackend::Sqlite => {
            format!(
                "sqlite://{}",
                dir.join(format!("atrium-{suffix:x}.db")).display()
            )
        }
        TestBackend::Postgres => {
            let Ok(server) = std::env::var(POSTGRES_URL_ENV) else {
                // A missing server is a failed test, not a skipped one.
                #[allow(clippy::panic)]
                {
                    panic!(
                        "{POSTGRES_URL_ENV} is not set: run `export {POSTGRES_URL_ENV}=$(scripts/postgres.sh)` \
                         (or scripts/test.sh, which does it)"
                    )
                }
            };
            let name = format!("atrium_test_{suffix:x}");
            let mut conn = match sqlx::PgConnection::connect(&server).await {
                Ok(c) => c,
                #[allow(clippy::panic)]
                Err(e) => panic!("cannot reach PostgreSQL at {server}: {e}"),
            };
            // An identifier cannot be a bound parameter; `name` is our own hex.
            let create = format!("CREATE DATABASE {name}");
            if let Err(e) = sqlx::Executor::execute(&mut conn, create.as_str()).await {
                #[allow(clippy::panic)]
                {
                    panic!("cannot create test database {name}: {e}")
                }
            }
            let base = server.rsplit_once('/').map(|(b, _)| b).unwrap_or(&server);
            format!("{base}/{name}")
        }
    }
}
