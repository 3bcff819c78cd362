//! Threads that help a shard make a large fan-out, without ever making it wait for one that has
//! not started.
//!
//! Why: a keyframe to a big room is thousands of copies, and on the room's one shard the last
//! subscribers wait for all of them; that span is what bounds an edge's p99 under load
//! (BENCHMARKS.md, "The fan-out span"). Spreading the copies over threads shortens it, but
//! only if handing work over costs less than it saves. On a busy host a woken thread may wait
//! milliseconds for a core, so a shard that hands a part to a helper and then waits for it
//! can lose more than the whole fan-out took alone (a pool that returns only when every
//! spawned job has run did exactly that in the multi-region bench). Here the shard posts the
//! job and makes parts itself at once; a helper that wakes in time claims parts too; when no
//! part is left the shard takes the job back from any helper that has not started on it, and
//! waits only for parts already being made.
//!
//! Parts are claimed by index from one counter, so each is made once; what each part borrows
//! is for the caller's closure to hand out (see `ShardCore::fan_out_spread`).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// One fan-out's parts, on the posting shard's stack while helpers may reach it.
struct Job<'a> {
    /// The next part to claim.
    next: AtomicUsize,
    parts: usize,
    /// Helpers that took the job and may still claim or make a part.
    active: AtomicUsize,
    /// Parts the helpers made.
    helped: AtomicUsize,
    work: &'a (dyn Fn(usize) + Sync),
}

impl Job<'_> {
    /// Makes parts until none is left to claim; returns how many it made.
    fn claim_all(&self) -> usize {
        let mut made = 0;
        loop {
            let part = self.next.fetch_add(1, Ordering::Relaxed);
            if part >= self.parts {
                return made;
            }
            (self.work)(part);
            made += 1;
        }
    }
}

/// A posted job as a helper's slot holds it.
#[derive(Clone, Copy, PartialEq)]
struct JobRef(*const Job<'static>);

// SAFETY: a `JobRef` is only dereferenced by a helper that took it from its slot under the
// slot's lock and counted itself in `active` before releasing the lock; the posting thread
// keeps the job alive until it has taken it back from every slot and `active` is zero
// (`Retract`).
unsafe impl Send for JobRef {}

#[derive(Default)]
struct Slot {
    job: Option<JobRef>,
    stop: bool,
}

#[derive(Default)]
struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        // Nothing is left half-done under this lock: a poisoned one is still consistent.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One shard's helper threads.
pub struct Helpers {
    shared: Vec<Arc<Shared>>,
    threads: Vec<JoinHandle<()>>,
}

impl Helpers {
    /// Starts `count` helper threads named `name-<i>` (none for 0).
    pub fn start(count: usize, name: &str) -> std::io::Result<Helpers> {
        let mut helpers = Helpers {
            shared: Vec::with_capacity(count),
            threads: Vec::with_capacity(count),
        };
        for i in 0..count {
            let shared = Arc::new(Shared::default());
            let theirs = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || help(&theirs))?;
            helpers.shared.push(shared);
            helpers.threads.push(thread);
        }
        Ok(helpers)
    }

    /// No helpers: [`run`](Self::run) makes every part on its caller's thread.
    pub fn none() -> Helpers {
        Helpers {
            shared: Vec::new(),
            threads: Vec::new(),
        }
    }

    /// How many helper threads there are.
    pub fn count(&self) -> usize {
        self.shared.len()
    }

    /// Runs `work(i)` for every `i` in `0..parts`, each once: on this thread, and on any
    /// helper that wakes while parts are left. Returns when every part is made, with how many
    /// the helpers made.
    pub fn run(&self, parts: usize, work: &(dyn Fn(usize) + Sync)) -> usize {
        if self.shared.is_empty() || parts <= 1 {
            (0..parts).for_each(work);
            return 0;
        }
        let job = Job {
            next: AtomicUsize::new(0),
            parts,
            active: AtomicUsize::new(0),
            helped: AtomicUsize::new(0),
            work,
        };
        let job_ref = JobRef(std::ptr::from_ref(&job).cast::<Job<'static>>());
        // Takes the job back and waits for its helpers even if a part panics on this thread.
        let retract = Retract {
            helpers: self,
            job: &job,
            job_ref,
        };
        for shared in &self.shared {
            shared.lock().job = Some(job_ref);
            shared.wake.notify_one();
        }
        job.claim_all();
        drop(retract);
        job.helped.load(Ordering::Relaxed)
    }
}

impl Drop for Helpers {
    fn drop(&mut self) {
        for shared in &self.shared {
            shared.lock().stop = true;
            shared.wake.notify_one();
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Ends a posted job: off every slot that still holds it, then waits for the helpers inside.
struct Retract<'h, 'j> {
    helpers: &'h Helpers,
    job: &'j Job<'j>,
    job_ref: JobRef,
}

impl Drop for Retract<'_, '_> {
    fn drop(&mut self) {
        for shared in &self.helpers.shared {
            let mut slot = shared.lock();
            if slot.job == Some(self.job_ref) {
                slot.job = None;
            }
        }
        // Only helpers that took the job before the slots were cleared are counted; each is
        // making at most one part by now.
        while self.job.active.load(Ordering::Acquire) > 0 {
            std::thread::yield_now();
        }
    }
}

/// A helper thread: waits for a job, makes parts of it while any is left, and again.
fn help(shared: &Shared) {
    loop {
        let job_ref = {
            let mut slot = shared.lock();
            loop {
                if slot.stop {
                    return;
                }
                if let Some(job_ref) = slot.job.take() {
                    // SAFETY: the job is alive while a slot holds it (see `JobRef`), and this
                    // count, taken under the lock, keeps it alive until the `fetch_sub` below.
                    unsafe { &*job_ref.0 }.active.fetch_add(1, Ordering::AcqRel);
                    break job_ref;
                }
                slot = shared
                    .wake
                    .wait(slot)
                    .unwrap_or_else(PoisonError::into_inner);
            }
        };
        // SAFETY: counted in `active` above; the job outlives the count.
        let job = unsafe { &*job_ref.0 };
        // A part that panics is a bug, reported by the panic hook; the shard must still hear
        // that this helper is out, or it would wait for it forever.
        let made = catch_unwind(AssertUnwindSafe(|| job.claim_all())).unwrap_or(0);
        job.helped.fetch_add(made, Ordering::Relaxed);
        job.active.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    #[test]
    fn every_part_is_made_once_with_or_without_helpers() {
        for helpers in [0, 1, 3] {
            let h = Helpers::start(helpers, "test-helper").unwrap();
            for parts in [0, 1, 2, 7, 100] {
                let made: Vec<AtomicU32> = (0..parts).map(|_| AtomicU32::new(0)).collect();
                h.run(parts, &|i| {
                    made[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(
                    made.iter().all(|m| m.load(Ordering::Relaxed) == 1),
                    "{helpers} helpers, {parts} parts: each made once"
                );
            }
        }
    }

    #[test]
    fn helpers_make_parts_when_they_wake_in_time() {
        let h = Helpers::start(1, "test-helper").unwrap();
        let caller = std::thread::current().id();
        let by_helper = AtomicU32::new(0);
        // Parts slow enough that the helper wakes before they run out.
        let helped = h.run(20, &|_| {
            std::thread::sleep(Duration::from_millis(2));
            if std::thread::current().id() != caller {
                by_helper.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(
            by_helper.load(Ordering::Relaxed) > 0,
            "the helper took some parts"
        );
        assert_eq!(
            helped,
            by_helper.load(Ordering::Relaxed) as usize,
            "and says so"
        );
    }

    #[test]
    fn the_caller_never_waits_for_a_helper_that_has_not_started() {
        let h = Helpers::start(1, "test-helper").unwrap();
        // A first job whose part on the helper blocks until released.
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let helper_busy = Arc::new(AtomicU32::new(0));
        std::thread::scope(|scope| {
            let (r, busy) = (release.clone(), helper_busy.clone());
            let h = &h;
            scope.spawn(move || {
                let caller = std::thread::current().id();
                h.run(2, &|_| {
                    if std::thread::current().id() != caller {
                        busy.store(1, Ordering::Release);
                        let (m, c) = &*r;
                        let mut go = m.lock().unwrap();
                        while !*go {
                            go = c.wait(go).unwrap();
                        }
                    } else {
                        // The caller's part waits for the helper to hold the other one.
                        while busy.load(Ordering::Acquire) == 0 {
                            std::thread::yield_now();
                        }
                    }
                });
            });
            while helper_busy.load(Ordering::Acquire) == 0 {
                std::thread::yield_now();
            }
            // The helper is stuck in the first job's part; a second job posted to it has to
            // be made by its caller alone, which returns without waiting for the helper.
            let made = AtomicU32::new(0);
            let all_here = std::sync::atomic::AtomicBool::new(true);
            std::thread::scope(|inner| {
                inner.spawn(|| {
                    let here = std::thread::current().id();
                    h.run(5, &|_| {
                        made.fetch_add(1, Ordering::Relaxed);
                        if std::thread::current().id() != here {
                            all_here.store(false, Ordering::Relaxed);
                        }
                    });
                });
            });
            assert_eq!(made.load(Ordering::Relaxed), 5);
            assert!(all_here.load(Ordering::Relaxed), "made by its caller alone");
            let (m, c) = &*release;
            *m.lock().unwrap() = true;
            c.notify_all();
        });
    }
}
