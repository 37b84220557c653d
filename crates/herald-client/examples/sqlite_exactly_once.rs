//! Exactly-once processing with SQLite: each message's effect and the channel's position are
//! written in ONE transaction, and the consumer resumes from the stored position. A crash
//! between receiving a message and committing loses nothing (the message comes again) and a
//! crash after committing repeats nothing (the position says it was applied).
//!
//! The effect here is a ledger: each message `{"amount": N}` adds N to an account balance and
//! appends a row to `applied`.
//!
//! Run a server (`herald serve --dev`), publish to `payments:demo`, then:
//! `cargo run -p herald-client --example sqlite_exactly_once -- ws://127.0.0.1:8080/v1/ws payments:demo ledger.db`

use std::path::Path;
use std::sync::{Arc, Mutex};

use herald_client::{
    Client, ClientOptions, Event, Message, Position, PositionStore, StoreError, SubscribeOptions,
};
use rusqlite::{Connection, OptionalExtension, params};

/// The application's state and its positions, in one SQLite database.
#[derive(Clone)]
pub struct Ledger {
    connection: Arc<Mutex<Connection>>,
}

impl Ledger {
    pub fn open(path: &Path) -> rusqlite::Result<Ledger> {
        let connection = Connection::open(path)?;
        connection.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS positions (channel TEXT PRIMARY KEY, position TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS balance (account TEXT PRIMARY KEY, amount INTEGER NOT NULL);
             -- No uniqueness on purpose: a message applied twice would show as two rows.
             CREATE TABLE IF NOT EXISTS applied (channel TEXT NOT NULL, serial INTEGER NOT NULL, id TEXT NOT NULL);",
        )?;
        Ok(Ledger {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// Applies one message's effect and records its position, atomically.
    pub fn apply(&self, message: &Message) -> Result<(), StoreError> {
        #[derive(serde::Deserialize)]
        struct Payment {
            amount: i64,
        }
        let payment: Payment = message.json()?;
        let mut connection = self.connection.lock().expect("ledger lock");
        let transaction = connection.transaction()?;
        transaction.execute(
            "INSERT INTO balance (account, amount) VALUES ('main', ?1)
             ON CONFLICT (account) DO UPDATE SET amount = amount + excluded.amount",
            params![payment.amount],
        )?;
        transaction.execute(
            "INSERT INTO applied (channel, serial, id) VALUES (?1, ?2, ?3)",
            params![message.channel, message.serial().0 as i64, message.id],
        )?;
        save_position(&transaction, &message.channel, &message.position)?;
        transaction.commit()?;
        Ok(())
    }

    pub fn balance(&self) -> rusqlite::Result<i64> {
        let connection = self.connection.lock().expect("ledger lock");
        connection
            .query_row(
                "SELECT amount FROM balance WHERE account = 'main'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map(|amount| amount.unwrap_or(0))
    }

    /// How many times each serial was applied, in serial order.
    pub fn applied(&self, channel: &str) -> rusqlite::Result<Vec<(u64, u64)>> {
        let connection = self.connection.lock().expect("ledger lock");
        let mut statement = connection.prepare(
            "SELECT serial, COUNT(*) FROM applied WHERE channel = ?1 GROUP BY serial ORDER BY serial",
        )?;
        let rows = statement.query_map(params![channel], |row| {
            Ok((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64))
        })?;
        rows.collect()
    }
}

fn save_position(
    connection: &Connection,
    channel: &str,
    position: &Position,
) -> rusqlite::Result<()> {
    connection.execute(
        "INSERT INTO positions (channel, position) VALUES (?1, ?2)
         ON CONFLICT (channel) DO UPDATE SET position = excluded.position",
        params![channel, position.to_string()],
    )?;
    Ok(())
}

/// The client loads each channel's position from the ledger when it subscribes.
impl PositionStore for Ledger {
    fn load(&self, channel: &str) -> Result<Option<Position>, StoreError> {
        let connection = self.connection.lock().expect("ledger lock");
        let text: Option<String> = connection
            .query_row(
                "SELECT position FROM positions WHERE channel = ?1",
                params![channel],
                |row| row.get(0),
            )
            .optional()?;
        Ok(text.map(|text| Position::parse(&text)).transpose()?)
    }

    fn save(&self, channel: &str, position: &Position) -> Result<(), StoreError> {
        let connection = self.connection.lock().expect("ledger lock");
        save_position(&connection, channel, position)?;
        Ok(())
    }
}

/// What to do with the next message.
pub enum Step {
    Apply,
    /// Apply it, then return.
    ApplyThenStop,
    /// Return without applying it, as a crash before the commit would.
    StopBefore,
}

/// Consumes `channel` into the ledger, resuming from its stored position; `decide` is asked
/// before each message. Returns how many messages were applied.
pub async fn consume(
    mut options: ClientOptions,
    channel: &str,
    ledger: &Ledger,
    mut decide: impl FnMut(&Message) -> Step,
) -> Result<u64, StoreError> {
    options.position_store = Some(Arc::new(ledger.clone()));
    let client = Client::connect(options)?;
    // From the stored position when there is one (the client loads it from the ledger),
    // otherwise from the oldest message the server keeps.
    let mut subscription = client
        .subscribe(channel, SubscribeOptions::from_oldest())
        .await?;
    let mut applied = 0;
    while let Some(event) = subscription.next().await {
        match event {
            Event::Message(message) => {
                let step = decide(&message);
                if let Step::StopBefore = step {
                    break;
                }
                ledger.apply(&message)?;
                applied += 1;
                if let Step::ApplyThenStop = step {
                    break;
                }
            }
            Event::ContinuityLost { from, to, reason } => {
                // The stored position is out of retention or from another epoch: the ledger
                // cannot be complete. A real application alerts or rebuilds here.
                return Err(format!("continuity lost ({reason}): {from} .. {to:?}").into());
            }
            Event::Broken(broken) => {
                // Reported by the SDK, which re-subscribes from the held position by itself.
                eprintln!("stream break on {channel}: {broken:?}");
            }
            Event::Closed { reason } => return Err(reason.into()),
            _ => {}
        }
    }
    Ok(applied)
}

#[tokio::main]
async fn main() -> Result<(), StoreError> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(channel), Some(path)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: sqlite_exactly_once WS_URL CHANNEL DB_PATH".into());
    };
    let ledger = Ledger::open(Path::new(&path))?;
    println!("balance before: {}", ledger.balance()?);
    let applied = consume(ClientOptions::new(url), &channel, &ledger, |message| {
        println!("applying {} ({})", message.position, message.id);
        Step::Apply
    })
    .await?;
    println!("applied {applied}; balance: {}", ledger.balance()?);
    Ok(())
}
