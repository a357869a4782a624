//! `hangar user add|list|passwd|delete`, `hangar mqtt-user add|list|delete` and `hangar audit`:
//! console users, the broker's application users and the audit log, through the admin API.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::client::{CliError, Client};
use super::{Global, endpoint, field, print_table};

/// `hangar user ...`
#[derive(Debug, Subcommand)]
pub enum UserCmd {
    /// Add a console user (the password is asked for, or read from --password-file).
    Add {
        /// Sign-in name: 1-64 of A-Z a-z 0-9 _ . -
        name: String,
        /// admin, operator or viewer.
        #[arg(long)]
        role: String,
        /// Read the password from this file's first line instead of asking.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// List the users.
    List {
        /// Print the API's JSON (an array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set a user's password (signs them out everywhere).
    Passwd {
        /// The user.
        name: String,
        /// Read the password from this file's first line instead of asking.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Change a user's role.
    Role {
        /// The user.
        name: String,
        /// admin, operator or viewer.
        role: String,
    },
    /// Delete a user (and end their sessions).
    Delete {
        /// The user.
        name: String,
    },
}

/// `hangar mqtt-user ...`
#[derive(Debug, Subcommand)]
pub enum MqttUserCmd {
    /// Add an application user of the broker (the password is asked for, or read from
    /// --password-file).
    Add {
        /// MQTT user name: 1-64 of A-Z a-z 0-9 _ . @ -
        name: String,
        /// Read the password from this file's first line instead of asking.
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Print the API's JSON instead of a sentence.
        #[arg(long)]
        json: bool,
    },
    /// List the application users (those of mqtt.password_file too).
    List {
        /// Print the API's JSON (an array) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete an application user (and close its connections).
    Delete {
        /// The user.
        name: String,
        /// Print the API's JSON instead of a sentence.
        #[arg(long)]
        json: bool,
    },
}

/// A list of users as the API's JSON, or as a table of these (header, field) columns.
fn print_users(list: &Value, json: bool, columns: &[(&str, &str)]) {
    if json {
        super::print_json(list);
        return;
    }
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|u| columns.iter().map(|(_, f)| field(u, f)).collect())
        .collect();
    let headers: Vec<&str> = columns.iter().map(|(h, _)| *h).collect();
    print_table(&headers, &rows, &[]);
}

/// Runs `hangar mqtt-user ...`.
pub async fn mqtt_user(g: &Global, cmd: MqttUserCmd) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(g))?;
    match cmd {
        MqttUserCmd::Add {
            name,
            password_file,
            json: as_json,
        } => {
            let password = password(password_file.as_deref())?;
            let u = client
                .post(
                    "/api/mqtt/users",
                    &[],
                    &json!({"name": name, "password": password}),
                )
                .await?;
            if as_json {
                super::print_json(&u);
            } else {
                println!("added MQTT user {}", field(&u, "name"));
            }
        }
        MqttUserCmd::List { json } => {
            let list = client.get("/api/mqtt/users", &[]).await?;
            print_users(
                &list,
                json,
                &[
                    ("NAME", "name"),
                    ("SOURCE", "source"),
                    ("CREATED", "createdAt"),
                ],
            );
        }
        MqttUserCmd::Delete { name, json } => {
            let path = format!(
                "/api/mqtt/users/{}",
                percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
            );
            let u = client.delete(&path, &[]).await?;
            if json {
                super::print_json(&u);
            } else {
                println!("deleted MQTT user {name}; its connections were closed");
            }
        }
    }
    Ok(())
}

/// `hangar audit`
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only this actor (a user name, admin-token, system).
    #[arg(long)]
    actor: Option<String>,
    /// Only this action, or a prefix ending in "." (campaign.).
    #[arg(long)]
    action: Option<String>,
    /// Only entries at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// At most this many (newest first).
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    api: super::Api,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> CliError {
    move |source| CliError::Io { context, source }
}

/// The first line of `file`, or a password typed at the terminal (twice, without echo), or
/// the first line of stdin when it is not a terminal.
pub(crate) fn password(file: Option<&Path>) -> Result<String, CliError> {
    password_with(file, true)
}

/// As [`password`], asked once at a terminal (to unlock an existing key).
pub(crate) fn password_once(file: Option<&Path>) -> Result<String, CliError> {
    password_with(file, false)
}

fn password_with(file: Option<&Path>, confirm: bool) -> Result<String, CliError> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).map_err(io(format!("reading {}", f.display())))?;
        return Ok(text.lines().next().unwrap_or("").to_string());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(io("reading the password from stdin".into()))?;
        return Ok(line.trim_end_matches(['\r', '\n']).to_string());
    }
    let first = ask("Password: ")?;
    if !confirm {
        return Ok(first);
    }
    let again = ask("Again: ")?;
    if first != again {
        return Err(CliError::Discover("the two passwords differ".into()));
    }
    Ok(first)
}

/// Reads a line from the terminal with echo off.
fn ask(prompt: &str) -> Result<String, CliError> {
    use std::os::fd::AsRawFd;
    let fd = std::io::stdin().as_raw_fd();
    eprint!("{prompt}");
    let _ = std::io::stderr().flush();
    // SAFETY: tcgetattr/tcsetattr on our own stdin with a zeroed, then filled, termios.
    let mut old: libc::termios = unsafe { std::mem::zeroed() };
    let have = unsafe { libc::tcgetattr(fd, &mut old) } == 0;
    if have {
        let mut quiet = old;
        quiet.c_lflag &= !libc::ECHO;
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let r = std::io::stdin().lock().read_line(&mut line);
    if have {
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &old) };
    }
    eprintln!();
    r.map_err(io("reading the password".into()))?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn user_path(name: &str) -> String {
    format!(
        "/api/users/{}",
        percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC)
    )
}

/// Runs `hangar user ...`.
pub async fn user(g: &Global, cmd: UserCmd) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(g))?;
    match cmd {
        UserCmd::Add {
            name,
            role,
            password_file,
        } => {
            let password = password(password_file.as_deref())?;
            let u = client
                .post(
                    "/api/users",
                    &[],
                    &json!({"name": name, "role": role, "password": password}),
                )
                .await?;
            println!("added {} ({})", field(&u, "name"), field(&u, "role"));
        }
        UserCmd::List { json } => {
            let list = client.get("/api/users", &[]).await?;
            print_users(
                &list,
                json,
                &[
                    ("NAME", "name"),
                    ("ROLE", "role"),
                    ("CREATED", "createdAt"),
                    ("PASSWORD CHANGED", "passwordChangedAt"),
                ],
            );
        }
        UserCmd::Passwd {
            name,
            password_file,
        } => {
            let password = password(password_file.as_deref())?;
            client
                .patch(&user_path(&name), &json!({"password": password}))
                .await?;
            println!("password of {name} changed; their sessions ended");
        }
        UserCmd::Role { name, role } => {
            let u = client
                .patch(&user_path(&name), &json!({"role": role}))
                .await?;
            println!("{} is now {}", field(&u, "name"), field(&u, "role"));
        }
        UserCmd::Delete { name } => {
            client.delete(&user_path(&name), &[]).await?;
            println!("deleted {name}");
        }
    }
    Ok(())
}

/// Runs `hangar audit`.
pub async fn audit(g: &Global, a: AuditArgs) -> Result<(), CliError> {
    let client = Client::connect(&endpoint(&g.with(&a.api)))?;
    let mut q = vec![("limit", a.limit.to_string())];
    for (k, v) in [("actor", a.actor), ("action", a.action), ("since", a.since)] {
        if let Some(v) = v {
            q.push((k, v));
        }
    }
    let list = client.get("/api/audit", &q).await?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = list
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|e: &Value| {
            vec![
                field(e, "seq"),
                field(e, "at"),
                field(e, "actor"),
                field(e, "via"),
                field(e, "action"),
                field(e, "target"),
                field(e, "result"),
            ]
        })
        .collect();
    print_table(
        &["SEQ", "AT", "ACTOR", "VIA", "ACTION", "TARGET", "RESULT"],
        &rows,
        &[0],
    );
    Ok(())
}
