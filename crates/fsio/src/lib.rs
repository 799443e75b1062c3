//! What every crate asks of the operating system the same way: files written whole or not at
//! all, JSON files, and peak resident memory.

use std::fs::{File, Permissions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tempfile::NamedTempFile;

/// A file that could not be written, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct WriteError {
    pub path: PathBuf,
    pub source: io::Error,
}

/// Writes `path` whole or not at all: `write` fills a new hidden file beside it, which is then
/// flushed to disk and renamed over `path`. A crash leaves the old file or the new one, and an
/// error removes the new one. The parent folder must exist.
///
/// `write` may fill the file it is given or replace it at its path (safetensors' writer renames
/// a file of its own there); either way the result gets the mode a plain create gives (0666 less
/// the umask).
pub fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut NamedTempFile) -> io::Result<()>,
) -> Result<(), WriteError> {
    let fail = |source| WriteError {
        path: path.to_path_buf(),
        source,
    };
    let name = path.file_name().ok_or_else(|| {
        fail(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path names no file",
        ))
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut staging = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .suffix(".tmp")
        .permissions(Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(fail)?;
    staging
        .as_file()
        .metadata()
        .and_then(|created| {
            write(&mut staging)?;
            let file = File::open(staging.path())?;
            file.set_permissions(created.permissions())?;
            file.sync_all()
        })
        .map_err(fail)?;
    staging.persist(path).map_err(|e| fail(e.error))?;
    Ok(())
}

/// How a JSON file ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonEnding {
    /// At the closing bracket.
    Bracket,
    /// With a line break after the closing bracket.
    Newline,
}

/// Writes `value` atomically as JSON indented by two spaces (serde_json's pretty form).
pub fn write_json(
    path: &Path,
    value: &impl Serialize,
    ending: JsonEnding,
) -> Result<(), WriteError> {
    write_atomically(path, |file| {
        let mut out = BufWriter::new(file);
        serde_json::to_writer_pretty(&mut out, value)?;
        if ending == JsonEnding::Newline {
            out.write_all(b"\n")?;
        }
        out.flush()
    })
}

/// Whose peak resident memory [`peak_rss_bytes`] reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeakOf {
    /// This process: the kernel's high-water mark (VmHWM of /proc/self/status).
    ThisProcess,
    /// The largest of the children waited for so far (getrusage's RUSAGE_CHILDREN).
    WaitedChildren,
}

/// The peak resident memory of `whose`, in bytes; `None` where Linux does not tell it.
pub fn peak_rss_bytes(whose: PeakOf) -> Option<u64> {
    match whose {
        PeakOf::ThisProcess => {
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kib * 1024)
        }
        PeakOf::WaitedChildren => {
            // SAFETY: getrusage only fills the struct it is given.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
                return None;
            }
            // Linux gives ru_maxrss in KiB.
            Some(u64::try_from(usage.ru_maxrss).ok()? * 1024)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_replaced_whole_with_the_usual_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, "old").unwrap();
        write_atomically(&path, |file| file.write_all(b"new")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, "").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&path), mode(&plain));
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary file is left"
        );
    }

    #[test]
    fn a_file_replaced_at_its_path_gets_the_usual_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomically(&path, |file| {
            // As safetensors does: a private file of its own, renamed over the given path.
            let private = tempfile::NamedTempFile::new_in(dir.path())?;
            std::fs::write(private.path(), "new")?;
            private.persist(file.path()).map_err(|e| e.error)?;
            Ok(())
        })
        .unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
        let plain = dir.path().join("plain.txt");
        std::fs::write(&plain, "").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode();
        assert_eq!(mode(&path), mode(&plain));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        std::fs::write(&path, "old").unwrap();
        let err = write_atomically(&path, |file| {
            file.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot write {}: disk full", path.display())
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = dir.path().join("no/such/folder/a.txt");
        let err = write_json(&missing, &1, JsonEnding::Bracket).unwrap_err();
        assert_eq!(err.path, missing);
    }

    #[test]
    fn json_is_pretty_printed_with_the_chosen_ending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        let value = serde_json::json!({ "b": [1, 2], "a": { "c": null } });
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        write_json(&path, &value, JsonEnding::Bracket).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), pretty);
        write_json(&path, &value, JsonEnding::Newline).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), pretty + "\n");
    }

    #[test]
    fn peak_memory_is_read() {
        let own = peak_rss_bytes(PeakOf::ThisProcess).unwrap();
        assert!(own > 0);
        assert!(peak_rss_bytes(PeakOf::WaitedChildren).is_some());
    }
}
