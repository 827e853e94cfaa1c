//! Reads the YAML files named on the command line: files as given, folders walked
//! recursively for `*.yaml` / `*.yml` in sorted order, so results never depend on the
//! order the file system lists entries in.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// A file's display name and contents.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{0}: {1}")]
    Read(PathBuf, #[source] io::Error),
    #[error("{0}: no .yaml or .yml files found")]
    Empty(PathBuf),
}

fn is_yaml(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), FilesError> {
    let mut entries: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| FilesError::Read(dir.to_owned(), e))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(|e| FilesError::Read(dir.to_owned(), e))?;
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out)?;
        } else if is_yaml(&p) {
            out.push(p);
        }
    }
    Ok(())
}

/// Reads every file named, or found below a folder named.
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<SourceFile>, FilesError> {
    let mut files = Vec::new();
    for p in paths {
        let meta = fs::metadata(p).map_err(|e| FilesError::Read(p.clone(), e))?;
        if meta.is_dir() {
            let before = files.len();
            walk(p, &mut files)?;
            if files.len() == before {
                return Err(FilesError::Empty(p.clone()));
            }
        } else {
            files.push(p.clone());
        }
    }
    files
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).map_err(|e| FilesError::Read(p.clone(), e))?;
            Ok(SourceFile {
                name: p.display().to_string(),
                text,
            })
        })
        .collect()
}
