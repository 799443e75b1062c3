//! Frozen shards that the ranks of one machine read from each other's shared memory.
//!
//! Gathering a unit over Gloo sends every rank's frozen shard through loopback TCP each time
//! the unit is used (twice a step with gradient checkpointing): on 2 cores the sockets' copies
//! take CPU time from the computation. Frozen shards never change, so each rank writes its own
//! once into a file in /dev/shm at wrap time, maps it as its own storage of them, and from then
//! on a gather is a positional read of each peer's file into the unit's buffer, with no message
//! and no wait on the peer. A rank reads peers' files rather than mapping them, so their pages
//! never count as its own resident memory. The files are unlinked as soon as every rank has
//! opened them: they disappear with the last process that holds them, even after a crash.
//!
//! Publishing needs every rank of the group on this machine with room in /dev/shm; all ranks
//! agree on whether it worked, and otherwise gathers go through the group.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::mem::MaybeUninit;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ff_dist::ProcessGroup;
use memmap2::Mmap;

use crate::error::FsdpResult;

const SHARED_MEMORY: &str = "/dev/shm";

pub struct PeerShards {
    rank: usize,
    /// This rank's shards, mapped from its own file.
    own: Mmap,
    /// Every rank's file, this rank's included.
    files: Vec<File>,
    /// Per unit: where its shard starts in every rank's file, and its length.
    units: Vec<(usize, usize)>,
}

impl PeerShards {
    /// Publishes this rank's frozen shard of every unit (`shards`, equally long on every rank
    /// unit by unit) for the other ranks of `group`. `None`, on every rank alike, when some
    /// rank could not write or open the files (another machine, no room in /dev/shm) or there
    /// is nothing to share.
    pub fn publish(group: &dyn ProcessGroup, shards: &[&[u8]]) -> FsdpResult<Option<Self>> {
        let total: usize = shards.iter().map(|s| s.len()).sum();
        if total == 0 || group.world_size() < 2 {
            return Ok(None);
        }
        let (rank, world) = (group.rank(), group.world_size());
        // A name no other job uses: rank 0's process id and clock, sent to every rank.
        let mut token = [0u8; 16];
        if rank == 0 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            token[..8].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
            token[8..].copy_from_slice(&nanos.to_le_bytes());
        }
        group.broadcast_bytes(&mut token, 0)?;
        let path = |r: usize| -> PathBuf {
            Path::new(SHARED_MEMORY).join(format!(
                "ferrofactory-fsdp-{:032x}-rank{r}",
                u128::from_le_bytes(token)
            ))
        };
        let own = write_shards(&path(rank), shards);
        let files = if all_agree(group, own.is_ok())? {
            (0..world).map(|r| File::open(path(r))).collect()
        } else {
            Err(std::io::ErrorKind::NotFound.into())
        };
        // Every rank has opened every file (or given up) once this returns.
        let opened = all_agree(group, files.is_ok())?;
        let _ = std::fs::remove_file(path(rank));
        let (Ok(own), Ok(files), true) = (own, files, opened) else {
            return Ok(None);
        };
        let mut units = Vec::with_capacity(shards.len());
        let mut offset = 0;
        for shard in shards {
            units.push((offset, shard.len()));
            offset += shard.len();
        }
        Ok(Some(Self {
            rank,
            own,
            files,
            units,
        }))
    }

    /// The length of one rank's shard of unit `unit`.
    pub fn shard_len(&self, unit: usize) -> usize {
        self.units[unit].1
    }

    /// Unit `unit`'s frozen shards of every rank, rank after rank, into `out`, all of which
    /// is written when this succeeds.
    pub fn read(&self, unit: usize, out: &mut [MaybeUninit<u8>]) -> std::io::Result<()> {
        let (offset, len) = self.units[unit];
        assert_eq!(
            out.len(),
            len * self.files.len(),
            "a unit's gathered length"
        );
        for (r, shard) in out.chunks_exact_mut(len).enumerate() {
            if r == self.rank {
                let own = &self.own[offset..offset + len];
                // SAFETY: `shard` and `own` are `len` bytes each and do not overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(own.as_ptr(), shard.as_mut_ptr().cast(), len)
                };
            } else {
                read_exact_at(&self.files[r], shard, offset as u64)?;
            }
        }
        Ok(())
    }
}

/// `File::read_exact_at` into memory not yet initialized.
fn read_exact_at(
    file: &File,
    mut out: &mut [MaybeUninit<u8>],
    mut offset: u64,
) -> std::io::Result<()> {
    while !out.is_empty() {
        // SAFETY: the kernel writes at most `out.len()` bytes, into `out`.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                out.as_mut_ptr().cast(),
                out.len(),
                offset as libc::off_t,
            )
        };
        match read {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n > 0 => {
                out = &mut out[n as usize..];
                offset += n as u64;
            }
            _ => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// Writes the shards one after another into a new file at `path` (write errors such as a full
/// /dev/shm surface here, where a mapping would fault) and maps it.
fn write_shards(path: &Path, shards: &[&[u8]]) -> std::io::Result<Mmap> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    let written = shards.iter().try_for_each(|s| file.write_all(s));
    if let Err(e) = written {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    // SAFETY: the file is this job's own, unlinked once every rank has opened it, and no
    // process writes to it again.
    unsafe { Mmap::map(&file) }
}

/// Whether `ok` holds on every rank of `group`.
fn all_agree(group: &dyn ProcessGroup, ok: bool) -> FsdpResult<bool> {
    let mut count = [f32::from(u8::from(ok))];
    group.all_reduce_sum(&mut count)?;
    Ok(count[0] as usize == group.world_size())
}
