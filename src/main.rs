//! The `newsroom` command: starts any role of the system, or all of them.

use clap::{Parser, Subcommand};
use newsroom::Roles;
use newsroom_infra::Settings;

/// newsroom — event-sourced CQRS news portal back end on Apache Kafka.
///
/// Every setting is also read from its NEWSROOM_* environment variable; the defaults
/// match the local infrastructure of `infra/local.sh up`.
#[derive(Parser)]
#[command(name = "newsroom", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Role,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand)]
enum Role {
    /// Every role in one process: command API, query API and projector.
    Run,
    /// The command API alone (validates commands, appends events to Kafka).
    CommandApi,
    /// The query API alone (serves the read models).
    QueryApi,
    /// The projector alone (builds the read models from the log).
    Project,
    /// Create the topics and apply the read-model migrations, then exit.
    Setup,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    newsroom_infra::telemetry::init();
    let roles = match cli.command {
        Role::Run => Roles::ALL,
        Role::CommandApi => Roles {
            command_api: true,
            query_api: false,
            projector: false,
        },
        Role::QueryApi => Roles {
            command_api: false,
            query_api: true,
            projector: false,
        },
        Role::Project => Roles {
            command_api: false,
            query_api: false,
            projector: true,
        },
        Role::Setup => {
            newsroom_infra::kafka::ensure_topics(&cli.settings.kafka).await?;
            let pool = newsroom_infra::db::connect(&cli.settings.postgres).await?;
            newsroom_infra::db::migrate(&pool).await?;
            newsroom_infra::db::check_deployment(&pool, &cli.settings.kafka.topic_prefix).await?;
            tracing::info!("topics and read-model schema are in place");
            return Ok(());
        }
    };
    newsroom::start(&cli.settings, roles)
        .await?
        .until_signal()
        .await
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
