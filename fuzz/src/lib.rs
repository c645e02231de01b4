//! kfdmux's fuzz targets as library functions (see docs/fuzzing.md).
pub mod kernel;
pub mod targets;
