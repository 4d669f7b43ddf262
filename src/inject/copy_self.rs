//! `wsdrain copy-self DEST`: wrap mode's init container copies the static binary into
//! the shared emptyDir (distroless has no `cp`). Written to a temporary name, then
//! renamed, so the app never sees a half-written executable.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

pub fn copy_self(dest: &Path) -> std::io::Result<()> {
    copy_executable(&std::env::current_exe()?, dest)
}

fn copy_executable(src: &Path, dest: &Path) -> std::io::Result<()> {
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::copy(src, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_executable() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"#!/bin/sh\n").unwrap();
        let dest = dir.path().join("wsdrain");
        copy_executable(&src, &dest).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"#!/bin/sh\n");
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(!dir.path().join("wsdrain.tmp").exists());
    }
}
