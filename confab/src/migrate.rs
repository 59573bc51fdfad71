//! `confab migrate`: creates or updates the PostgreSQL schemas of the
//! distributed mode (group-svc's metadata, message-svc's messages and event
//! sequences). Idempotent; `confab serve --migrate-on-start` runs the same.

use std::process::ExitCode;

use anyhow::Context as _;

/// Arguments of `confab migrate`.
#[derive(Debug, clap::Args)]
pub(crate) struct MigrateArgs {
    /// The PostgreSQL database of the deployment.
    #[arg(long, env = "CONFAB_POSTGRES_URL", hide_env_values = true)]
    postgres_url: String,
}

/// Runs every migration and exits.
pub(crate) async fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    confab_common::telemetry::init_tracing();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.postgres_url)
        .await
        .context("cannot connect to PostgreSQL")?;
    run_on(&pool).await?;
    pool.close().await;
    println!("confab migrate: schema up to date");
    Ok(ExitCode::SUCCESS)
}

/// Runs every migration on `pool`.
pub(crate) async fn run_on(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    confab_group_svc::migrate_postgres(pool)
        .await
        .context("group-svc migrations failed")?;
    confab_message_svc::migrate_postgres(pool)
        .await
        .context("message-svc migrations failed")?;
    Ok(())
}
