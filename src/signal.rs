//! Interrupts (Ctrl-C's SIGINT, and SIGTERM, what Slurm and Kubernetes send on preemption) as a
//! flag that long work polls between units of work (a tuning candidate, a training step), so a
//! run stops where its state is consistent: it saves what can be resumed, removes what cannot,
//! and the process exits 130 or 143 (128 + the signal), never 0.
//!
//! [`pending`] is all a caller needs to read: a multi-rank run can agree on a step to stop at.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// An interrupt that asks the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGINT (Ctrl-C).
    Interrupt,
    /// SIGTERM (a scheduler's preemption, `kill`).
    Terminate,
}

impl Signal {
    /// The exit status of a process stopped by this signal, as a shell reports one it killed.
    pub fn exit_code(self) -> u8 {
        match self {
            Signal::Interrupt => 130,
            Signal::Terminate => 143,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }

    /// 1 (SIGINT) or 2 (SIGTERM): what ranks exchange to agree on a stop (0: none).
    pub fn raw(sig: Option<Signal>) -> usize {
        match sig {
            None => 0,
            Some(Signal::Interrupt) => 1,
            Some(Signal::Terminate) => 2,
        }
    }

    pub fn from_raw(v: usize) -> Option<Signal> {
        match v {
            1 => Some(Signal::Interrupt),
            2 => Some(Signal::Terminate),
            _ => None,
        }
    }
}

/// The latest signal received (0: none, 1: SIGINT, 2: SIGTERM).
fn state() -> &'static Arc<AtomicUsize> {
    static STATE: OnceLock<Arc<AtomicUsize>> = OnceLock::new();
    STATE.get_or_init(|| Arc::new(AtomicUsize::new(0)))
}

/// Catch SIGINT and SIGTERM from now on: they set [`pending`] instead of killing the process.
/// Idempotent. Fails only if the platform refuses the handlers.
pub fn install() -> anyhow::Result<()> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let register = |sig, value| {
                signal_hook::flag::register_usize(sig, state().clone(), value).map(drop).map_err(|e| e.to_string())
            };
            register(signal_hook::consts::SIGINT, 1)?;
            register(signal_hook::consts::SIGTERM, 2)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!("cannot install the SIGINT/SIGTERM handlers: {e}"))
}

/// The signal received since [`install`], if any (the latest when several arrived: both ask to
/// stop).
pub fn pending() -> Option<Signal> {
    Signal::from_raw(state().load(Ordering::SeqCst))
}

/// Raise `sig` as if it had been received (tests, and a rank told by another to stop).
pub fn raise(sig: Signal) {
    state().store(
        match sig {
            Signal::Interrupt => 1,
            Signal::Terminate => 2,
        },
        Ordering::SeqCst,
    );
}

/// The error long work returns when it stopped for a signal; `main` turns it into exit code
/// 130 / 143 and prints its message (what was kept) instead of an `error:` line.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: Signal,
    /// What the run left behind: a resumable checkpoint, or nothing (empty: not said yet; the
    /// caller that knows fills it in).
    pub outcome: String,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.outcome.as_str() {
            "" => write!(f, "interrupted ({})", self.signal.name()),
            o => write!(f, "interrupted ({}): {o}", self.signal.name()),
        }
    }
}

impl std::error::Error for Interrupted {}

/// `Err(Interrupted)` if a signal is pending: long loops call this between units of work.
pub fn check() -> anyhow::Result<()> {
    match pending() {
        Some(signal) => Err(Interrupted { signal, outcome: String::new() }.into()),
        None => Ok(()),
    }
}

/// The [`Interrupted`] anywhere in `e`'s chain.
pub fn interrupted(e: &anyhow::Error) -> Option<&Interrupted> {
    e.chain().find_map(|c| c.downcast_ref::<Interrupted>())
}
