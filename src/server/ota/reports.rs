//! What a device report means, as pure functions: [`interpret`] turns the payload of a report
//! topic into a [`Report`] (one shape for both protocols), [`pick`] finds the task a progress
//! report belongs to, and [`Step::input`] says what the report does to it ([`super::state`]).
//! No store, no clock: the driver ([`super::Ota`]) looks things up and applies the result.

use super::counters::{Dropped, Used};
use super::state::Input;
use crate::protocol::{Inbound, alibaba, gateway};
use crate::server::store::{TaskRecord, TaskStatus};

/// Longest device-supplied error message kept on a task.
const ERROR_MESSAGE_CHARS: usize = 512;

/// A report of either protocol, as the task engine sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Not a report of its topic (bad JSON, a field outside its pattern): dropped, counted.
    Malformed(String),
    /// The device says which version it runs (gateway `heartbeat`, Alibaba inform) and,
    /// optionally, its type and the delta formats it applies.
    Version {
        version: String,
        device_type: Option<String>,
        delta_formats: Option<Vec<String>>,
    },
    /// Progress of an upgrade.
    Progress {
        target: Target,
        step: Step,
        /// The version the device runs meanwhile (gateway `data.currentVersion`).
        running: Option<String>,
    },
    /// An Alibaba `firmware/get`: answer with the pending upgrade, if any, under this id.
    Get { request_id: String },
}

/// Which task a progress report is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The one the msgId names (the device's active task, or its newest).
    MsgId(String),
    /// A gateway report without a msgId (the tutorial's simulator): the device's active task.
    Unnamed,
    /// An Alibaba report (they carry no task id): the device's active task.
    Active,
}

/// What a progress report says happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The device acknowledged the command (`state: pending`): liveness only.
    Alive,
    /// It is in this stage, at this percentage (none: not said).
    Stage {
        status: TaskStatus,
        progress: Option<u8>,
    },
    /// It completed the install.
    Completed,
    /// It failed. `delta_may_be_why`: the failure may be the delta's (a gateway failure, an
    /// Alibaba download or verify failure), so with a delta offered the task retries with
    /// the full image.
    Failed {
        code: String,
        message: Option<String>,
        delta_may_be_why: bool,
    },
}

impl Step {
    /// The state machine's input for this step.
    pub fn input(&self) -> Input {
        let progress = |status, progress| Input::Progress {
            status,
            progress,
            error_code: None,
            error_message: None,
            delta_may_be_why: false,
        };
        match self {
            Step::Alive => Input::Alive,
            Step::Stage {
                status,
                progress: p,
            } => progress(*status, *p),
            Step::Completed => progress(TaskStatus::Completed, None),
            Step::Failed {
                code,
                message,
                delta_may_be_why,
            } => Input::Progress {
                status: TaskStatus::Failed,
                progress: None,
                error_code: Some(code.clone()),
                error_message: message.clone(),
                delta_may_be_why: *delta_may_be_why,
            },
        }
    }
}

/// Reads the payload of a report topic of this kind.
pub fn interpret(kind: &Inbound, payload: &[u8]) -> Report {
    let read = match kind {
        Inbound::GatewayReport => gateway::parse_report(payload).map(gateway_report),
        Inbound::AlibabaInform => alibaba::parse_inform(payload).map(|i| Report::Version {
            version: i.params.version,
            device_type: None,
            delta_formats: i.params.delta_formats,
        }),
        Inbound::AlibabaProgress => {
            alibaba::parse_progress(payload).map(|(_, s)| Report::Progress {
                target: Target::Active,
                step: alibaba_step(s),
                running: None,
            })
        }
        Inbound::AlibabaGet => {
            alibaba::parse_get(payload).map(|g| Report::Get { request_id: g.id })
        }
    };
    read.unwrap_or_else(Report::Malformed)
}

fn gateway_report(r: gateway::Report) -> Report {
    match r {
        gateway::Report::Heartbeat(h) => Report::Version {
            version: h.firmware_version,
            device_type: h.device_type,
            delta_formats: h.delta_formats,
        },
        gateway::Report::Progress { msg_id, mut data } => Report::Progress {
            target: msg_id.map_or(Target::Unnamed, Target::MsgId),
            running: data.current_version.take(),
            step: gateway_step(data),
        },
    }
}

fn gateway_step(d: gateway::ProgressData) -> Step {
    let stage = |status| Step::Stage {
        status,
        progress: d.progress.map(|p| p as u8),
    };
    match d.state {
        gateway::State::Pending => Step::Alive,
        gateway::State::Downloading => stage(TaskStatus::Downloading),
        gateway::State::Verifying => stage(TaskStatus::Verifying),
        gateway::State::Installing => stage(TaskStatus::Installing),
        gateway::State::Completed => Step::Completed,
        gateway::State::Failed => Step::Failed {
            code: gateway::error_code_text(&d.error_code).unwrap_or_else(|| "FAILED".into()),
            message: d
                .error_message
                .map(|s| s.chars().take(ERROR_MESSAGE_CHARS).collect()),
            delta_may_be_why: true,
        },
    }
}

/// Alibaba steps: 1–99 downloading; 100 is "installed, rebooting" (the inform after the
/// reboot decides, see [`super::state`]); negative steps fail with their code.
fn alibaba_step(s: alibaba::Step) -> Step {
    match s {
        alibaba::Step::Progress(n) if n < 100 => Step::Stage {
            status: TaskStatus::Downloading,
            progress: Some(n),
        },
        alibaba::Step::Progress(_) => Step::Stage {
            status: TaskStatus::Installing,
            progress: Some(100),
        },
        failed => Step::Failed {
            code: failed.error_code().unwrap_or("FAILED").into(),
            message: None,
            delta_may_be_why: matches!(
                failed,
                alibaba::Step::DownloadFailed | alibaba::Step::VerifyFailed
            ),
        },
    }
}

/// Why a progress report found no task: the drop counter and a detail for the log.
pub type NoTask = (Dropped, String);

/// The task a progress report is for, and how its use is counted; `newest` is the device's
/// newest task, looked up only when a msgId does not name the active one.
pub fn pick<E>(
    target: &Target,
    active: Option<TaskRecord>,
    newest: impl FnOnce() -> Result<Option<TaskRecord>, E>,
) -> Result<Result<(TaskRecord, Used), NoTask>, E> {
    Ok(match target {
        Target::MsgId(mid) => match active {
            Some(t) if t.msg_id == *mid => Ok((t, Used::Applied)),
            _ => match newest()?.filter(|t| t.msg_id == *mid) {
                Some(t) => Ok((t, Used::Applied)),
                None => Err((Dropped::UnknownMsgId, format!("{mid:?}"))),
            },
        },
        Target::Unnamed => active
            .map(|t| (t, Used::MatchedWithoutMsgId))
            .ok_or((Dropped::NoMsgId, "and no active task to give it to".into())),
        Target::Active => active
            .map(|t| (t, Used::Applied))
            .ok_or((Dropped::NoActiveTask, "progress".into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskStatus::*;

    fn gw(json: &str) -> Report {
        interpret(&Inbound::GatewayReport, json.as_bytes())
    }

    fn gw_progress(msg_id: &str, data: &str) -> Report {
        gw(&format!(
            r#"{{"msgType":"ota_progress","msgId":{msg_id},"data":{data}}}"#
        ))
    }

    fn ali(step: &str) -> Report {
        interpret(
            &Inbound::AlibabaProgress,
            format!(r#"{{"id":"1","params":{{"step":{step},"desc":""}}}}"#).as_bytes(),
        )
    }

    fn progress(target: Target, step: Step, running: Option<&str>) -> Report {
        Report::Progress {
            target,
            step,
            running: running.map(Into::into),
        }
    }

    fn failed(code: &str, message: Option<&str>, delta: bool) -> Step {
        Step::Failed {
            code: code.into(),
            message: message.map(Into::into),
            delta_may_be_why: delta,
        }
    }

    #[test]
    fn gateway_reports_of_both_documents() {
        let stage = |status, progress| Step::Stage { status, progress };
        let mid = || Target::MsgId("ota_1".into());
        let table = [
            (
                gw_progress(
                    r#""ota_1""#,
                    r#"{"state":"downloading","progress":45,"currentVersion":"1.0.1"}"#,
                ),
                progress(mid(), stage(Downloading, Some(45)), Some("1.0.1")),
            ),
            // the tutorial's simulator: no msgId (missing, null or "")
            (
                gw(r#"{"msgType":"ota_progress","data":{"state":"installing"}}"#),
                progress(Target::Unnamed, stage(Installing, None), None),
            ),
            (
                gw_progress("null", r#"{"state":"verifying","progress":100}"#),
                progress(Target::Unnamed, stage(Verifying, Some(100)), None),
            ),
            (
                gw_progress(r#""""#, r#"{"state":"completed","progress":100}"#),
                progress(Target::Unnamed, Step::Completed, None),
            ),
            (
                gw_progress(r#""ota_1""#, r#"{"state":"pending"}"#),
                progress(mid(), Step::Alive, None),
            ),
            // a failure without a code is FAILED; numbers become text; the delta may be why
            (
                gw_progress(r#""ota_1""#, r#"{"state":"failed"}"#),
                progress(mid(), failed("FAILED", None, true), None),
            ),
            (
                gw_progress(
                    r#""ota_1""#,
                    r#"{"state":"failed","errorCode":-2,"errorMessage":"md5"}"#,
                ),
                progress(mid(), failed("-2", Some("md5"), true), None),
            ),
            (
                gw(
                    r#"{"msgType":"heartbeat","data":{"firmwareVersion":"1.0.2","deviceType":"gw","deltaFormats":["bsdiff40"]}}"#,
                ),
                Report::Version {
                    version: "1.0.2".into(),
                    device_type: Some("gw".into()),
                    delta_formats: Some(vec!["bsdiff40".into()]),
                },
            ),
        ];
        for (i, (got, want)) in table.into_iter().enumerate() {
            assert_eq!(got, want, "row {i}");
        }
    }

    #[test]
    fn a_long_error_message_is_cut_and_bad_reports_say_why() {
        let long = "x".repeat(2000);
        let Report::Progress {
            step: Step::Failed { message, .. },
            ..
        } = gw_progress(
            r#""m""#,
            &format!(r#"{{"state":"failed","errorMessage":"{long}"}}"#),
        )
        else {
            panic!("not a failure");
        };
        assert_eq!(message.unwrap().len(), ERROR_MESSAGE_CHARS);
        for (bad, says) in [
            ("not json", "malformed JSON"),
            (r#"{"msgType":"reboot","data":{}}"#, "unknown msgType"),
            (
                r#"{"msgType":"ota_progress","data":{"state":"downloading","progress":101}}"#,
                "outside 0..100",
            ),
            (
                r#"{"msgType":"heartbeat","data":{"firmwareVersion":"1.0 beta"}}"#,
                "outside the pattern",
            ),
        ] {
            match gw(bad) {
                Report::Malformed(why) => assert!(why.contains(says), "{bad}: {why}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(ali("-5"), Report::Malformed(why) if why.contains("outside the table")));
    }

    #[test]
    fn alibaba_steps() {
        let stage = |status, p| Step::Stage {
            status,
            progress: Some(p),
        };
        let table = [
            ("1", stage(Downloading, 1)),
            (r#""99""#, stage(Downloading, 99)),
            // installed, rebooting: the next inform decides
            ("100", stage(Installing, 100)),
            ("-1", failed("UPGRADE_FAILED", None, false)),
            ("-2", failed("DOWNLOAD_FAILED", None, true)),
            (r#""-3""#, failed("VERIFY_FAILED", None, true)),
            ("-4", failed("INSTALL_FAILED", None, false)),
        ];
        for (step, want) in table {
            assert_eq!(
                ali(step),
                progress(Target::Active, want, None),
                "step {step}"
            );
        }
        assert_eq!(
            interpret(
                &Inbound::AlibabaInform,
                br#"{"id":1,"params":{"version":"2.0.0"}}"#
            ),
            Report::Version {
                version: "2.0.0".into(),
                device_type: None,
                delta_formats: None
            }
        );
        assert_eq!(
            interpret(
                &Inbound::AlibabaGet,
                br#"{"id":"42","version":"1.0","params":{},"method":"thing.ota.firmware.get"}"#
            ),
            Report::Get {
                request_id: "42".into()
            }
        );
    }

    #[test]
    fn steps_become_state_machine_inputs() {
        assert_eq!(Step::Alive.input(), Input::Alive);
        assert_eq!(
            failed("VERIFY_FAILED", Some("sha"), true).input(),
            Input::Progress {
                status: Failed,
                progress: None,
                error_code: Some("VERIFY_FAILED".into()),
                error_message: Some("sha".into()),
                delta_may_be_why: true,
            }
        );
        assert!(matches!(
            Step::Completed.input(),
            Input::Progress {
                status: Completed,
                delta_may_be_why: false,
                ..
            }
        ));
    }

    #[test]
    fn pick_finds_the_task_or_says_why_not() {
        let task = |id: u64, mid: &str| {
            let mut t = crate::server::store::sample_task(id, "GW1");
            t.msg_id = mid.into();
            t
        };
        let none = || Ok::<_, ()>(None);
        let newest = |t: TaskRecord| move || Ok::<_, ()>(Some(t));
        let ok =
            |r: Result<Result<(TaskRecord, Used), NoTask>, ()>| r.unwrap().map(|(t, u)| (t.id, u));
        let mid = |s: &str| Target::MsgId(s.into());
        // the active task's msgId; else the newest task's (a late report of an ended one)
        assert_eq!(
            ok(pick(&mid("a"), Some(task(1, "a")), none)),
            Ok((1, Used::Applied))
        );
        assert_eq!(
            ok(pick(&mid("b"), Some(task(1, "a")), newest(task(2, "b")))),
            Ok((2, Used::Applied))
        );
        assert_eq!(
            ok(pick(&mid("c"), Some(task(1, "a")), newest(task(2, "b"))))
                .unwrap_err()
                .0,
            Dropped::UnknownMsgId
        );
        // no msgId: the active task, counted as such
        assert_eq!(
            ok(pick(&Target::Unnamed, Some(task(1, "a")), none)),
            Ok((1, Used::MatchedWithoutMsgId))
        );
        assert_eq!(
            ok(pick(&Target::Unnamed, None, none)).unwrap_err().0,
            Dropped::NoMsgId
        );
        assert_eq!(
            ok(pick(&Target::Active, None, none)).unwrap_err().0,
            Dropped::NoActiveTask
        );
        // the newest task is not read when the active one is named
        let r = pick(&mid("a"), Some(task(1, "a")), || -> Result<_, ()> {
            panic!("read the newest task")
        });
        assert!(r.is_ok());
    }
}
