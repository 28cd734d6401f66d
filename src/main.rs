//! The `newsroom` command: starts any role of the system, or all of them.

use clap::{Parser, Subcommand};
use newsroom::Roles;
use newsroom_infra::Settings;

/// mimalloc instead of the system allocator: glibc's malloc and free were a third of the
/// query API's CPU when it answers lists (per-thread arenas, consolidation; ADR 20).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Every role in one process: command API, query API, projector, recommender,
    /// notifier and the web console.
    Run,
    /// The command API alone (validates commands, appends events to Kafka).
    CommandApi,
    /// The query API alone (serves the read models).
    QueryApi,
    /// The projector alone (builds the read models from the log).
    Project,
    /// The recommender alone (users' affinities and the published articles, in Redis).
    Recommend,
    /// The notifier alone (inbox entries, and e-mails over SMTP).
    Notify,
    /// The operator's web console alone, at `/admin` (admins log in through the command
    /// API: NEWSROOM_CONSOLE_COMMAND_URL).
    Console,
    /// Create the topics and apply the read-model migrations, then exit.
    Setup,
    /// Rebuild a read model from the start of the log into a new version while the
    /// current one keeps serving, then switch the query side to it and drop the old one.
    Replay {
        /// The read model: users, news, reads, cache (Redis), recommend (Redis) or notify.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(newsroom::PROJECTIONS))]
        projection: String,
        /// Print no progress lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Build a read model afresh from the log beside the version that serves, compare the
    /// two row by row (key by key) at the live consumer's offsets, print every difference
    /// and drop the fresh copy. Exits with status 1 when they differ. The live consumer is
    /// held only for the last short round of the build (at most 15 s) and the comparison
    /// (at most 30 s more).
    Verify {
        /// The read model: users, news, reads, cache (Redis), recommend (Redis) or notify.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(newsroom::PROJECTIONS))]
        projection: String,
        /// Print no progress lines.
        #[arg(long)]
        quiet: bool,
    },
    /// Print an API's OpenAPI description (the one it serves at /openapi.json), generated
    /// from its handlers, types and validation code.
    Openapi {
        /// Which API.
        #[arg(value_parser = ["command", "query"])]
        api: String,
    },
    /// Events a consumer could not apply, and the ones parked behind them.
    DeadLetters {
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Subcommand)]
enum DeadLetterAction {
    /// List parked aggregates: the event that failed, why, and how many wait behind it.
    List {
        /// Only this consumer's.
        #[arg(long)]
        consumer: Option<String>,
    },
    /// Apply an aggregate's parked events again, in order (after fixing the cause).
    Retry {
        /// The consumer (users, news, reads, cache, recommend, notify).
        consumer: String,
        /// The aggregate (its id); every parked aggregate of the consumer if left out.
        #[arg(long)]
        aggregate: Option<String>,
    },
    /// Drop an aggregate's failed event for good, then apply the ones behind it.
    Skip {
        /// The consumer (users, news, reads, cache, recommend, notify).
        consumer: String,
        /// The aggregate (its id).
        #[arg(long)]
        aggregate: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    newsroom_infra::telemetry::init();
    let outcome = run(cli).await;
    // Log lines wait in a buffer for a moment: write them before the process ends.
    newsroom_infra::telemetry::flush();
    outcome
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let roles = match cli.command {
        Role::Run => Roles::ALL,
        Role::CommandApi => Roles {
            command_api: true,
            ..Roles::NONE
        },
        Role::QueryApi => Roles {
            query_api: true,
            ..Roles::NONE
        },
        Role::Project => Roles {
            projector: true,
            ..Roles::NONE
        },
        Role::Recommend => Roles {
            recommender: true,
            ..Roles::NONE
        },
        Role::Notify => Roles {
            notifier: true,
            ..Roles::NONE
        },
        Role::Console => Roles {
            console: true,
            ..Roles::NONE
        },
        Role::Replay { projection, quiet } => {
            newsroom::replay(&cli.settings, &projection, quiet).await?;
            return Ok(());
        }
        Role::Verify { projection, quiet } => {
            let verdict = newsroom::verify(&cli.settings, &projection, quiet).await?;
            let found = &verdict.differences;
            for line in &found.named {
                println!("{line}");
            }
            if found.count > found.named.len() as u64 {
                println!("... and {} more", found.count - found.named.len() as u64);
            }
            println!(
                "verify {projection}: version {} {} a fresh build from the log ({} rows or keys compared, {} differences, {:.1} s)",
                verdict.active,
                if found.count == 0 {
                    "equals"
                } else {
                    "differs from"
                },
                found.compared,
                found.count,
                verdict.elapsed.as_secs_f64()
            );
            // Written before the process ends with a status that says they differ.
            newsroom_infra::telemetry::flush();
            if found.count > 0 {
                std::process::exit(1);
            }
            return Ok(());
        }
        Role::DeadLetters { action } => {
            return newsroom::dead_letters::run(&cli.settings, action.into()).await;
        }
        Role::Openapi { api } => {
            let document = match api.as_str() {
                "command" => newsroom_command::openapi::document()?,
                _ => newsroom_query::openapi::document()?,
            };
            println!("{document}");
            return Ok(());
        }
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

impl From<DeadLetterAction> for newsroom::dead_letters::Action {
    fn from(action: DeadLetterAction) -> Self {
        use newsroom::dead_letters::Action;
        match action {
            DeadLetterAction::List { consumer } => Action::List { consumer },
            DeadLetterAction::Retry {
                consumer,
                aggregate,
            } => Action::Request {
                consumer,
                aggregate,
                skip: false,
            },
            DeadLetterAction::Skip {
                consumer,
                aggregate,
            } => Action::Request {
                consumer,
                aggregate: Some(aggregate),
                skip: true,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
