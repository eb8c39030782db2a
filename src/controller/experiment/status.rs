//! The one writer of an Experiment's status and events: each pass ends in a [`Step`], and
//! [`write`] turns it into the next status (written only when it differs) and, for a new step,
//! an event.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::Api;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};

use crate::api::{Experiment, ExperimentStatus, InputRecord, MountRecord, Phase, TransferProgress};
use crate::controller::{Context, ReconcileError};
use crate::plan::contract::truncate;
use crate::reason::Reason;

/// The condition saying whether the spec is valid and its datastores usable.
pub const ACCEPTED: &str = "Accepted";
/// The condition saying whether the experiment succeeded: Unknown while it runs (the reason is
/// the phase), True when it succeeded, False when it failed or cannot start.
pub const SUCCEEDED: &str = "Succeeded";

/// The condition saying the controller cannot reconcile the experiment: False, with the failure's
/// reason and the apiserver's own answer, while its passes keep failing; absent otherwise (the
/// next good pass's status drops it).
pub const RECONCILED: &str = "Reconciled";

/// One step of an experiment, as its status reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub phase: Phase,
    /// `Accepted` condition: `None` is True, `Some((reason, message))` is False.
    pub refused: Option<(Reason, String)>,
    /// The `Succeeded` condition's reason.
    pub reason: Reason,
    /// What happened, for humans.
    pub message: String,
    /// Publish its event as a Warning even though nothing failed.
    pub warning: bool,
    /// How far the transfer in progress is (Downloading, Uploading).
    pub progress: Option<Box<TransferProgress>>,
}

impl Step {
    pub fn new(phase: Phase, reason: Reason, message: impl Into<String>) -> Step {
        Step {
            phase,
            refused: None,
            reason,
            message: message.into(),
            warning: false,
            progress: None,
        }
    }

    pub fn warning(mut self) -> Step {
        self.warning = true;
        self
    }

    pub fn with_progress(mut self, progress: Option<TransferProgress>) -> Step {
        self.progress = progress.map(Box::new);
        self
    }

    /// The spec or its datastores keep the experiment from starting.
    pub fn refused(phase: Phase, reason: Reason, message: impl Into<String>) -> Step {
        let message = message.into();
        Step {
            phase,
            refused: Some((reason, message.clone())),
            reason,
            message,
            warning: true,
            progress: None,
        }
    }

    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Succeeded | Phase::Failed) && self.refused.is_none()
    }
}

/// The status after `step`: conditions keep their transition time while their status holds;
/// the start time is set once, when the run starts, and the completion time when it ends.
/// Equal to `current` when nothing changed, so an unchanged experiment is not written.
pub fn next_status(
    current: &ExperimentStatus,
    generation: Option<i64>,
    step: &Step,
    inputs: Vec<InputRecord>,
    started: bool,
    now: &Time,
) -> ExperimentStatus {
    let accepted = match &step.refused {
        None => condition(
            ACCEPTED,
            "True",
            Reason::Accepted,
            "the spec is valid and every datastore is usable",
            generation,
        ),
        Some((reason, message)) => condition(ACCEPTED, "False", *reason, message, generation),
    };
    let succeeded = match step.phase {
        Phase::Succeeded => condition(SUCCEEDED, "True", step.reason, &step.message, generation),
        Phase::Failed => condition(SUCCEEDED, "False", step.reason, &step.message, generation),
        _ => condition(SUCCEEDED, "Unknown", step.reason, &step.message, generation),
    };
    let conditions = [accepted, succeeded]
        .into_iter()
        .map(|mut c| {
            if let Some(old) = current.conditions.iter().find(|o| o.type_ == c.type_)
                && old.status == c.status
            {
                c.last_transition_time = old.last_transition_time.clone();
            } else {
                c.last_transition_time = now.clone();
            }
            c
        })
        .collect();
    let start_time = current
        .start_time
        .clone()
        .or_else(|| started.then(|| now.clone()));
    let completion_time = current
        .completion_time
        .clone()
        .or_else(|| step.finished().then(|| now.clone()));
    ExperimentStatus {
        phase: Some(step.phase),
        conditions,
        observed_generation: generation,
        start_time,
        completion_time,
        message: Some(step.message.clone()),
        inputs: if inputs.is_empty() {
            current.inputs.clone()
        } else {
            inputs
        },
        // Decided when the run started (the driver of each mount), never by progress.
        mounts: current.mounts.clone(),
        progress: step.progress.as_deref().cloned(),
    }
}

/// The status of an experiment whose passes keep failing: what it said stays (a pass that fails
/// observed nothing), its phase is Pending if it had none, its message and the [`RECONCILED`]
/// condition say why. Equal to `current` while the cause is the same, so it is written once.
pub fn failing_status(
    current: &ExperimentStatus,
    generation: Option<i64>,
    reason: Reason,
    message: &str,
    now: &Time,
) -> ExperimentStatus {
    let mut failing = condition(RECONCILED, "False", reason, message, generation);
    failing.last_transition_time = current
        .conditions
        .iter()
        .find(|c| c.type_ == RECONCILED && c.status == "False")
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    let mut next = current.clone();
    next.phase = Some(current.phase.unwrap_or(Phase::Pending));
    next.message = Some(message.to_string());
    next.conditions.retain(|c| c.type_ != RECONCILED);
    next.conditions.push(failing);
    next
}

/// Says in the status, and in an event when the cause is new, why the experiment's passes keep
/// failing.
pub async fn write_failure(
    exp: &Experiment,
    ctx: &Context,
    error: &ReconcileError,
) -> Result<(), ReconcileError> {
    let current = exp.status.clone().unwrap_or_default();
    let reason = error.reason();
    let message = format!(
        "the controller cannot reconcile this Experiment and retries every {}s: {error}",
        crate::controller::ERROR_RETRY.as_secs()
    );
    let message = truncate(&message, 1024);
    let next = failing_status(
        &current,
        exp.metadata.generation,
        reason,
        message,
        &Time(ctx.now_k8s()),
    );
    if next == current {
        return Ok(());
    }
    let api: Api<Experiment> =
        Api::namespaced(ctx.client.clone(), &exp.namespace().unwrap_or_default());
    crate::controller::apply_status(&api, &exp.name_any(), &next).await?;
    let event = Event {
        type_: EventType::Warning,
        reason: reason.to_string(),
        note: Some(message.to_string()),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &exp.object_ref(&())).await {
        tracing::warn!(experiment = %exp.name_any(), error = %e, "cannot publish an event");
    }
    Ok(())
}

fn condition(
    type_: &str,
    status: &str,
    reason: Reason,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: Time(Default::default()),
    }
}

/// The reason of the experiment's `Succeeded` condition, as last written.
pub fn succeeded_reason(exp: &Experiment) -> Option<&str> {
    exp.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == SUCCEEDED)
        .map(|c| c.reason.as_str())
}

/// What a pass writes besides its step.
#[derive(Clone, Debug, Default)]
pub struct Record {
    /// What the downloads delivered (empty: keep what is recorded).
    pub inputs: Vec<InputRecord>,
    /// The run has started (its Job was created): the start time is set once.
    pub started: bool,
    /// How each mount is mounted, and why: decided once, when the run starts.
    pub mounts: Option<Vec<MountRecord>>,
}

impl Record {
    /// A pass of a started run, with the inputs recorded so far.
    pub fn started(inputs: Vec<InputRecord>) -> Record {
        Record {
            inputs,
            started: true,
            mounts: None,
        }
    }
}

/// Writes the status `step` leads to, if it differs from the current one, and publishes an event
/// when the step is new (a new phase or reason, or a new refusal). Returns the status as it now is.
pub async fn write(
    exp: &Experiment,
    ctx: &Context,
    step: &Step,
    record: Record,
) -> Result<ExperimentStatus, ReconcileError> {
    let current = exp.status.clone().unwrap_or_default();
    let now = Time(ctx.now_k8s());
    let mut next = next_status(
        &current,
        exp.metadata.generation,
        step,
        record.inputs,
        record.started,
        &now,
    );
    if let Some(mounts) = record.mounts {
        next.mounts = mounts;
    }
    if next == current {
        return Ok(next);
    }
    let api: Api<Experiment> =
        Api::namespaced(ctx.client.clone(), &exp.namespace().unwrap_or_default());
    crate::controller::apply_status(&api, &exp.name_any(), &next).await?;
    ctx.metrics.status_written(&current, &next);
    if is_new_step(&current, &next) {
        let failed = step.warning || step.phase == Phase::Failed;
        let event = Event {
            type_: if failed {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: step.reason.to_string(),
            note: Some(truncate(&step.message, 1024).to_string()),
            action: if step.refused.is_some() {
                "Validate"
            } else {
                "Run"
            }
            .to_string(),
            secondary: None,
        };
        // An event is a courtesy: failing to publish one must not stop the run.
        if let Err(e) = ctx.recorder.publish(&event, &exp.object_ref(&())).await {
            tracing::warn!(experiment = %exp.name_any(), error = %e, "cannot publish an event");
        }
    }
    Ok(next)
}

/// A new phase, a new reason, or a refusal with a new message (progress within a phase, like
/// "1 of 2 downloads done", is not an event).
fn is_new_step(current: &ExperimentStatus, next: &ExperimentStatus) -> bool {
    let key = |s: &ExperimentStatus| {
        let succeeded = s.conditions.iter().find(|c| c.type_ == SUCCEEDED);
        let accepted = s.conditions.iter().find(|c| c.type_ == ACCEPTED);
        (
            s.phase,
            succeeded.map(|c| c.reason.clone()),
            accepted
                .filter(|c| c.status == "False")
                .map(|c| c.message.clone()),
        )
    };
    key(current) != key(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).unwrap())
    }

    #[test]
    fn status_keeps_transition_and_start_times_and_is_unchanged_when_nothing_moved() {
        let pending = Step::new(Phase::Pending, Reason::Created, "created Job x-run");
        let first = next_status(
            &ExperimentStatus::default(),
            Some(1),
            &pending,
            vec![],
            true,
            &at(10),
        );
        assert_eq!(first.phase, Some(Phase::Pending));
        assert_eq!(first.start_time, Some(at(10)));
        assert_eq!(first.completion_time, None);
        assert_eq!(first.observed_generation, Some(1));
        let accepted = &first.conditions[0];
        assert_eq!(
            (accepted.type_.as_str(), accepted.status.as_str()),
            (ACCEPTED, "True")
        );
        let succeeded = &first.conditions[1];
        assert_eq!(
            (
                succeeded.type_.as_str(),
                succeeded.status.as_str(),
                succeeded.reason.as_str()
            ),
            (SUCCEEDED, "Unknown", "Created")
        );

        // The same step later: nothing to write.
        assert_eq!(
            next_status(&first, Some(1), &pending, vec![], true, &at(99)),
            first
        );

        // Running: the Succeeded condition stays Unknown, so its transition time stays too.
        let running = Step::new(Phase::Running, Reason::Running, "the script is running");
        let second = next_status(&first, Some(1), &running, vec![], true, &at(20));
        assert_eq!(second.conditions[1].reason, "Running");
        assert_eq!(second.conditions[1].last_transition_time, at(10));
        assert_eq!(second.start_time, Some(at(10)));

        let done = Step::new(Phase::Succeeded, Reason::Succeeded, "the script succeeded");
        let third = next_status(&second, Some(1), &done, vec![], true, &at(30));
        assert_eq!(third.conditions[1].status, "True");
        assert_eq!(third.conditions[1].last_transition_time, at(30));
        assert_eq!(third.completion_time, Some(at(30)));
    }

    #[test]
    fn a_refusal_is_not_a_start_nor_a_completion() {
        let refusal = Step::refused(
            Phase::Failed,
            Reason::PathOnComputeClash,
            "parameters --a and --b overlap",
        );
        let status = next_status(
            &ExperimentStatus::default(),
            Some(2),
            &refusal,
            vec![],
            false,
            &at(5),
        );
        assert_eq!(status.phase, Some(Phase::Failed));
        assert_eq!(status.start_time, None);
        assert_eq!(status.completion_time, None, "a fixed spec still runs");
        let accepted = &status.conditions[0];
        assert_eq!(
            (
                accepted.status.as_str(),
                accepted.reason.as_str(),
                accepted.message.as_str()
            ),
            (
                "False",
                "PathOnComputeClash",
                "parameters --a and --b overlap"
            )
        );
        assert_eq!(status.conditions[1].status, "False");
    }

    #[test]
    fn a_failing_experiment_says_why_once_per_cause_and_the_next_good_pass_drops_it() {
        // An Experiment the controller never got to: no status at all.
        let first = failing_status(
            &ExperimentStatus::default(),
            Some(1),
            Reason::KubeInternalError,
            "etcd timed out",
            &at(10),
        );
        assert_eq!(first.phase, Some(Phase::Pending));
        assert_eq!(first.message.as_deref(), Some("etcd timed out"));
        let failing = first
            .conditions
            .iter()
            .find(|c| c.type_ == RECONCILED)
            .unwrap();
        assert_eq!(
            (
                failing.status.as_str(),
                failing.reason.as_str(),
                failing.message.as_str()
            ),
            ("False", "KubeInternalError", "etcd timed out")
        );
        // The same cause later: nothing to write.
        let again = failing_status(
            &first,
            Some(1),
            Reason::KubeInternalError,
            "etcd timed out",
            &at(40),
        );
        assert_eq!(again, first);
        // Another cause: written, and the condition keeps its transition time.
        let other = failing_status(&first, Some(1), Reason::KubeForbidden, "forbidden", &at(70));
        assert_ne!(other, first);
        let failing = other
            .conditions
            .iter()
            .find(|c| c.type_ == RECONCILED)
            .unwrap();
        assert_eq!(failing.last_transition_time, at(10));

        // A running experiment keeps its phase and its other conditions.
        let running = next_status(
            &ExperimentStatus::default(),
            Some(1),
            &Step::new(Phase::Running, Reason::Running, "the script is running"),
            vec![],
            true,
            &at(5),
        );
        let stuck = failing_status(&running, Some(1), Reason::KubeRequest, "no answer", &at(6));
        assert_eq!(stuck.phase, Some(Phase::Running));
        assert_eq!(stuck.conditions.len(), 3);
        // The next good pass: its status has no Reconciled condition, so it is written.
        let good = next_status(
            &stuck,
            Some(1),
            &Step::new(Phase::Running, Reason::Running, "the script is running"),
            vec![],
            true,
            &at(7),
        );
        assert!(good.conditions.iter().all(|c| c.type_ != RECONCILED));
        assert_eq!(good, running);
    }

    #[test]
    fn recorded_inputs_survive_steps_that_report_none() {
        let record = InputRecord {
            name: "--data".into(),
            datastore: "ds".into(),
            path: "p".into(),
            files: 1,
            bytes: 1,
            digest: "sha256:cc".into(),
            seconds: None,
            cache: None,
            cache_reason: None,
        };
        let running = Step::new(Phase::Running, Reason::Running, "running");
        let first = next_status(
            &ExperimentStatus::default(),
            None,
            &running,
            vec![record.clone()],
            true,
            &at(1),
        );
        let done = Step::new(Phase::Succeeded, Reason::Succeeded, "done");
        let second = next_status(&first, None, &done, vec![], true, &at(2));
        assert_eq!(second.inputs, vec![record]);
    }
}
