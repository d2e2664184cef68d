//! Speaking for a running agent: a step that printed a line and waits for a gate, and the
//! means to publish result events for its attempt as its own agent would (its broker user,
//! its validated `user_id`), bypassing whatever the agent itself checks or cleans.

use crate::{AgentOpts, Stack, eventually};
use gantry_shared::ids::TaskId;
use gantry_shared::wire::{Event, Origin};
use std::path::PathBuf;
use std::time::Duration;

/// A step running on a real agent, and its attempt's coordinates.
pub struct HeldStep {
    pub task: TaskId,
    /// Create this file to let the step end.
    pub gate: PathBuf,
    pub origin: Origin,
    /// The seq after the agent's own lines so far.
    pub next_seq: u64,
    user: String,
    password: String,
}

impl HeldStep {
    /// Start an agent and a one-step task that prints `before` and waits for the gate; wait
    /// until its first line is stored.
    pub async fn start(stack: &mut Stack) -> HeldStep {
        let agent = stack.add_agent("a1", AgentOpts::default()).await.unwrap();
        let gate = stack.dir.path().join("gate");
        let task = stack
            .submit(&format!(
                "name = \"t\"\n[[steps]]\nname = \"work\"\nscript = '''\necho before\nwhile [ ! -e '{}' ]; do sleep 0.05; done\necho after\n'''\n",
                gate.display()
            ))
            .await
            .unwrap();
        eventually(Duration::from_secs(30), "the first line stored", || async {
            let log = stack.log(task).await.ok()?;
            log.iter().any(|l| l.text == "before").then_some(())
        })
        .await
        .unwrap();
        // The agent's lines so far (its own first line included): ours continue them.
        let next_seq: u64 = stack
            .log(task)
            .await
            .unwrap()
            .iter()
            .filter_map(|l| l.seq)
            .max()
            .map_or(0, |s| s + 1);
        let t = stack.task(task).await.unwrap();
        let a = t.steps[0].attempts[0].clone();
        let origin = Origin {
            step_run_id: t.steps[0].id,
            attempt: a.attempt,
            job_id: a.job_id,
            worker_id: a.worker_id.unwrap(),
        };
        let creds = stack.broker_credentials(agent).unwrap();
        HeldStep {
            task,
            gate,
            origin,
            next_seq,
            user: creds.user,
            password: creds.password,
        }
    }

    /// Publish an event to the results exchange as the step's agent.
    pub async fn publish(&self, stack: &Stack, event: &Event) {
        let x = stack.topology().results_exchange();
        stack
            .publish_as(
                (&self.user, &self.password),
                &x,
                "",
                &event.encode(),
                Some(&self.user),
            )
            .await
            .unwrap();
    }

    /// Let the step end.
    pub fn release(&self) {
        std::fs::write(&self.gate, b"").unwrap();
    }
}
