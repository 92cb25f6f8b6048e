//! Data set names -> [`DataSource`](super::DataSource)s. (stub, replaced by the data work)
use serde::{Deserialize, Serialize};
/// Names `open` accepts.
pub const KNOWN_DATASETS: &[&str] = &[];
/// Data options.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DataConfig {}
/// Open a data set by name.
pub fn open(name: &str, _cfg: &DataConfig) -> crate::Result<Box<dyn super::DataSource>> {
    Err(crate::Error::UnknownDataset { name: name.into(), known: String::new() })
}
