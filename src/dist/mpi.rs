//! [`Comm`] over MPI (cargo feature `mpi`): the world communicator of `mpirun` / `srun`.
//!
//! The collectives are called through the raw bindings so that every return code is checked: the
//! world's error handler is MPI_ERRORS_RETURN, so a failed collective (a rank that died, a broken
//! link) comes back here as a one-line error naming the operation instead of aborting inside MPI
//! or hanging. (Open MPI's launcher also ends the job when a rank dies.)

use std::os::raw::c_int;

use anyhow::{bail, Result};
use mpi::ffi;
use mpi::traits::{AsRaw, Communicator};

use super::Comm;

pub struct Mpi {
    world: mpi::topology::SimpleCommunicator,
    rank: usize,
    size: usize,
    // Dropped last: MPI_Finalize.
    _universe: mpi::environment::Universe,
}

fn check(code: c_int, what: &str, rank: usize) -> Result<()> {
    if code != ffi::MPI_SUCCESS as c_int {
        let mut buf = vec![0u8; ffi::MPI_MAX_ERROR_STRING as usize + 1];
        let mut len: c_int = 0;
        // SAFETY: buf holds MPI_MAX_ERROR_STRING bytes as MPI_Error_string requires.
        unsafe { ffi::MPI_Error_string(code, buf.as_mut_ptr() as *mut _, &mut len) };
        let msg = String::from_utf8_lossy(&buf[..len.max(0) as usize]).trim().to_string();
        bail!("rank {rank}: MPI {what} failed ({msg}); another rank probably died, stopping");
    }
    Ok(())
}

impl Mpi {
    /// MPI_Init (MPI_THREAD_SERIALIZED: one thread at a time, not always the main one: test harnesses) and the world, with
    /// errors returned.
    pub fn init() -> Result<Mpi> {
        let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Serialized) else {
            bail!("MPI was already initialised in this process");
        };
        let world = universe.world();
        // SAFETY: a valid communicator and a predefined error handler.
        let code = unsafe { ffi::MPI_Comm_set_errhandler(world.as_raw(), ffi::RSMPI_ERRORS_RETURN) };
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        check(code, "MPI_Comm_set_errhandler", rank)?;
        Ok(Mpi { world, rank, size, _universe: universe })
    }
}

impl Drop for Mpi {
    /// A rank that panics ends the whole job: finalising while the others wait in a collective
    /// would hang them.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort(101);
        }
    }
}

impl Comm for Mpi {
    fn abort(&self, code: i32) {
        // SAFETY: the world communicator; MPI_Abort does not return on success.
        unsafe { ffi::MPI_Abort(self.world.as_raw(), code) };
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn sum_pipelined(
        &self,
        sizes: &[usize],
        produce: &mut dyn FnMut(usize, &mut [f32]) -> Result<()>,
        consume: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        // Separate send and receive buffers (no MPI_IN_PLACE); they stay put until every request
        // is complete (the waits below run before they drop, even on an error).
        let mut sends: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0f32; n]).collect();
        let mut recvs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0f32; n]).collect();
        let mut requests: Vec<ffi::MPI_Request> = Vec::with_capacity(sizes.len());
        let mut failed = None;
        for (k, (s, r)) in sends.iter_mut().zip(recvs.iter_mut()).enumerate() {
            if let Err(e) = produce(k, s) {
                failed = Some(e);
                break;
            }
            let mut req = std::mem::MaybeUninit::<ffi::MPI_Request>::uninit();
            // SAFETY: both buffers hold s.len() floats and outlive the request (waited below).
            let code = unsafe {
                ffi::MPI_Iallreduce(
                    s.as_ptr() as *const _,
                    r.as_mut_ptr() as *mut _,
                    s.len() as c_int,
                    ffi::RSMPI_FLOAT,
                    ffi::RSMPI_SUM,
                    self.world.as_raw(),
                    req.as_mut_ptr(),
                )
            };
            if let Err(e) = check(code, "MPI_Iallreduce", self.rank) {
                failed = Some(e);
                break;
            }
            // SAFETY: MPI_Iallreduce succeeded, so it wrote the request.
            requests.push(unsafe { req.assume_init() });
        }
        if !requests.is_empty() {
            // SAFETY: requests from MPI_Iallreduce; statuses ignored.
            let code =
                unsafe { ffi::MPI_Waitall(requests.len() as c_int, requests.as_mut_ptr(), ffi::RSMPI_STATUSES_IGNORE) };
            check(code, "MPI_Waitall (gradient all-reduce)", self.rank)?;
        }
        if let Some(e) = failed {
            return Err(e);
        }
        for (k, r) in recvs.iter().enumerate() {
            consume(k, r)?;
        }
        Ok(())
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let mut len = bytes.len() as u64;
        // SAFETY: one u64, then len bytes (resized on the receivers first).
        let code =
            unsafe { ffi::MPI_Bcast(&mut len as *mut u64 as *mut _, 1, ffi::RSMPI_UINT64_T, 0, self.world.as_raw()) };
        check(code, "MPI_Bcast", self.rank)?;
        bytes.resize(len as usize, 0);
        let code = unsafe {
            ffi::MPI_Bcast(bytes.as_mut_ptr() as *mut _, len as c_int, ffi::RSMPI_UINT8_T, 0, self.world.as_raw())
        };
        check(code, "MPI_Bcast", self.rank)
    }

    fn min_max(&self, v: u64) -> Result<(u64, u64)> {
        let mut out = [0u64; 2];
        for (op, o) in [(unsafe { ffi::RSMPI_MIN }, 0), (unsafe { ffi::RSMPI_MAX }, 1)] {
            // SAFETY: one u64 in and out.
            let code = unsafe {
                ffi::MPI_Allreduce(
                    &v as *const u64 as *const _,
                    &mut out[o] as *mut u64 as *mut _,
                    1,
                    ffi::RSMPI_UINT64_T,
                    op,
                    self.world.as_raw(),
                )
            };
            check(code, "MPI_Allreduce", self.rank)?;
        }
        Ok((out[0], out[1]))
    }
}
