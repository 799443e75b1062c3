//! The output folder before any work: resume, refuse or reuse, as LLaMA-Factory decides.

use std::path::{Path, PathBuf};

use ff_config::TrainArgs;
use ff_dist::ProcessGroup;

use crate::checkpoint::{list_checkpoints, TRAINER_STATE};
use crate::error::{TrainError, TrainResult};
use crate::offload::check_offload_dir;

use super::TRAINER_LOG;

/// Checks `output_dir` before any work, as LLaMA-Factory does: an existing non-empty folder is
/// resumed from its newest checkpoint, refused when it has none, or reused with
/// `overwrite_output_dir` (which drops the old trainer log). Returns the checkpoint to resume.
pub fn prepare_output_dir(args: &TrainArgs, output_dir: &Path) -> TrainResult<Option<PathBuf>> {
    let explicit = match args.resume_from_checkpoint.as_deref() {
        None => None,
        Some(v) if v.eq_ignore_ascii_case("false") => None,
        Some(v) if v.eq_ignore_ascii_case("true") => match list_checkpoints(output_dir).pop() {
            Some((_, dir)) => Some(dir),
            None => {
                return Err(TrainError::Config(format!(
                    "resume_from_checkpoint is true but {} holds no checkpoint-N folder",
                    output_dir.display()
                )))
            }
        },
        Some(path) => {
            let dir = PathBuf::from(path);
            if !dir.exists() {
                return Err(TrainError::Config(format!(
                    "resume_from_checkpoint {path} does not exist"
                )));
            }
            if !dir.join(TRAINER_STATE).is_file() {
                return Err(TrainError::Config(format!(
                    "resume_from_checkpoint {path} is not a checkpoint folder (it has no {TRAINER_STATE})"
                )));
            }
            Some(dir)
        }
    };
    if output_dir.exists() && !output_dir.is_dir() {
        return Err(TrainError::Config(format!(
            "output_dir {} is a file, not a folder; choose another output_dir",
            output_dir.display()
        )));
    }
    if explicit.is_some() {
        return Ok(explicit);
    }
    let non_empty = std::fs::read_dir(output_dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !non_empty {
        return Ok(None);
    }
    if args.overwrite_output_dir {
        let log = output_dir.join(TRAINER_LOG);
        if log.exists() {
            std::fs::remove_file(&log).map_err(|e| TrainError::io(&log, e))?;
        }
        return Ok(None);
    }
    match list_checkpoints(output_dir).pop() {
        Some((_, dir)) => Ok(Some(dir)),
        None => Err(TrainError::Config(format!(
            "output_dir {} already exists and is not empty; set overwrite_output_dir: true or choose another output_dir",
            output_dir.display()
        ))),
    }
}

/// Refuses an `offload_optimizer_dir` that cannot hold the offload files, before any work.
pub fn check_offload(args: &TrainArgs) -> TrainResult<()> {
    match &args.offload_optimizer_dir {
        Some(dir) => check_offload_dir(Path::new(dir)),
        None => Ok(()),
    }
}

/// Rank 0 alone inspects and prepares the folder (creating it); the others follow its decision.
/// Returns the checkpoint to resume, the same on every rank.
pub(super) fn agree_on_resume(
    args: &TrainArgs,
    output_dir: &Path,
    group: &dyn ProcessGroup,
) -> TrainResult<Option<PathBuf>> {
    let resume_from = if group.rank() == 0 {
        let resume = prepare_output_dir(args, output_dir)?;
        std::fs::create_dir_all(output_dir).map_err(|e| TrainError::io(output_dir, e))?;
        resume
    } else {
        None
    };
    let text = resume_from
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let text = group.broadcast_blob(text.as_bytes(), 0)?;
    Ok((!text.is_empty()).then(|| PathBuf::from(String::from_utf8_lossy(&text).into_owned())))
}
