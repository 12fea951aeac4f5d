//! `--export-name` and `--description`, shared by `serve`, `listen` and
//! `proxy`; `export_name_arg` also checks the client side's `--export-name`.

use crate::proto::consts::MAX_STRING_LEN;
use crate::server::ExportNames;

/// The export's name and description as clients see them.
#[derive(Debug, Clone, clap::Args)]
pub struct NameArgs {
    /// The name clients must ask for (default: the empty name). A client
    /// asking for another name is refused (NBD_REP_ERR_UNKNOWN, or the
    /// connection closed after NBD_OPT_EXPORT_NAME), so a mistyped URI never
    /// reaches this disk. NBD_OPT_LIST lists it.
    #[arg(long, value_name = "NAME", default_value = "", value_parser = export_name_arg)]
    pub export_name: String,
    /// A description of the export for clients (NBD_INFO_DESCRIPTION, and
    /// the NBD_OPT_LIST entry).
    #[arg(long, value_name = "TEXT", value_parser = export_name_arg)]
    pub description: Option<String>,
}

impl NameArgs {
    pub fn names(&self) -> ExportNames {
        ExportNames {
            name: self.export_name.clone(),
            description: self.description.clone(),
        }
    }
}

/// An NBD string: at most 4096 bytes of UTF-8, no NUL.
pub fn export_name_arg(s: &str) -> Result<String, String> {
    if s.len() > MAX_STRING_LEN {
        return Err(format!(
            "longer than the {MAX_STRING_LEN} bytes NBD allows ({} bytes)",
            s.len()
        ));
    }
    if s.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    Ok(s.to_owned())
}
