//! The demo's database: the seed's task as the article writes it, against a
//! `users` table in PostgreSQL. `WASMQ_DATABASE_URL` if it answers, else a
//! private server on a free port (the tests' fixture), like Redis.
//!
//! The URL reaches the worker the way an operator's would: sealed with the
//! worker's secrets key into the tenant's secret `database:app`, which the
//! `onboard` task's policy grants by name.

use tokio_postgres::NoTls;
use wasmq::broker::Broker;
use wasmq::secrets::{self, SecretsKey};

use super::fixture::postgres::PostgresServer;

/// The demo's database, and the private server behind it if the demo
/// started one (stopped when this drops).
pub struct DemoDatabase {
    pub url: String,
    _server: Option<PostgresServer>,
}

/// `WASMQ_DATABASE_URL` if it answers, else a private PostgreSQL.
pub async fn for_demo() -> anyhow::Result<DemoDatabase> {
    if let Ok(url) = std::env::var("WASMQ_DATABASE_URL") {
        if tokio_postgres::connect(&url, NoTls).await.is_ok() {
            return Ok(DemoDatabase { url, _server: None });
        }
    }
    // The fixture panics with initdb's or the server's log if it cannot
    // start one; that is the message an operator needs.
    let server = tokio::task::spawn_blocking(PostgresServer::start).await?;
    println!("started a private PostgreSQL on port {}", server.port);
    Ok(DemoDatabase {
        url: server.url.clone(),
        _server: Some(server),
    })
}

async fn client(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Create the `users` table with `users` in it, not yet onboarded (a table
/// or row already there is kept as it is), and store the database's URL as
/// `tenant`'s secret `database:app`, sealed with `key`.
pub async fn prepare(
    broker: &Broker,
    tenant: &str,
    key: &SecretsKey,
    url: &str,
    users: &[i64],
) -> anyhow::Result<()> {
    let db = client(url).await?;
    db.execute(
        "CREATE TABLE IF NOT EXISTS users (id int8 PRIMARY KEY, name text, \
             onboarded bool NOT NULL DEFAULT false)",
        &[],
    )
    .await?;
    for user in users {
        db.execute(
            "INSERT INTO users (id, name) VALUES ($1, 'Ada') ON CONFLICT (id) DO NOTHING",
            &[user],
        )
        .await?;
    }
    let name = format!("{}app", secrets::DATABASE_PREFIX);
    let sealed = key
        .seal(tenant, &secrets::field(&name, None), url.as_bytes())
        .map_err(anyhow::Error::msg)?;
    broker.secret_put(tenant, &name, None, &sealed).await
}

/// The `onboarded` flag of `user`'s row.
pub async fn onboarded(url: &str, user: i64) -> anyhow::Result<bool> {
    let row = client(url)
        .await?
        .query_one("SELECT onboarded FROM users WHERE id = $1", &[&user])
        .await?;
    Ok(row.get(0))
}
