//! Log lines in shoal/logger.py's format, on stderr:
//! `[RustFrontend pid=1234] INFO 12:00:01 shoal.frontend.engine: message`.
//! The level comes from SHOAL_LOGGING_LEVEL (DEBUG, INFO, WARNING, ERROR; default INFO).
//! Use the macros: `log_info!("all {} engine(s) ready", n)` (also `log_debug!`,
//! `log_warn!`, `log_error!`); the logger name is derived from the calling module.

use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Debug = 10,
    Info = 20,
    Warning = 30,
    Error = 40,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warning => "WARNING",
            Level::Error => "ERROR",
        }
    }

    /// A SHOAL_LOGGING_LEVEL value (Python's level names, case-insensitive, or a number).
    pub fn parse(text: &str) -> Option<Level> {
        match text.trim().to_ascii_uppercase().as_str() {
            "DEBUG" => Some(Level::Debug),
            "INFO" => Some(Level::Info),
            "WARNING" | "WARN" => Some(Level::Warning),
            "ERROR" | "CRITICAL" | "FATAL" => Some(Level::Error),
            other => other.parse::<u8>().ok().map(|n| match n {
                0..=10 => Level::Debug,
                11..=20 => Level::Info,
                21..=30 => Level::Warning,
                _ => Level::Error,
            }),
        }
    }
}

static MIN_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static ROLE: OnceLock<String> = OnceLock::new();

/// Set the process role and the level (SHOAL_LOGGING_LEVEL); call once at start.
pub fn init(role: &str) {
    let _ = ROLE.set(role.to_string());
    if let Ok(value) = std::env::var("SHOAL_LOGGING_LEVEL") {
        match Level::parse(&value) {
            Some(level) => MIN_LEVEL.store(level as u8, Ordering::Relaxed),
            None => log(
                Level::Warning,
                module_path!(),
                format_args!("ignored SHOAL_LOGGING_LEVEL={value:?} (not a level name)"),
            ),
        }
    }
}

pub fn enabled(level: Level) -> bool {
    level as u8 >= MIN_LEVEL.load(Ordering::Relaxed)
}

/// `shoal_frontend::engine` -> `shoal.frontend.engine`.
fn logger_name(module: &str) -> String {
    let rest = module.strip_prefix("shoal_frontend").unwrap_or(module);
    format!("shoal.frontend{}", rest.replace("::", "."))
}

/// Local wall-clock time as HH:MM:SS (logging's datefmt).
fn clock() -> String {
    let now = unsafe { libc::time(std::ptr::null_mut()) };
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r writes only into `tm`, which outlives the call.
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return "??:??:??".to_string();
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// Write one line (use the macros).
pub fn log(level: Level, module: &str, args: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let role = ROLE.get().map(String::as_str).unwrap_or("RustFrontend");
    let line = format!(
        "[{role} pid={}] {} {} {}: {args}\n",
        std::process::id(),
        level.name(),
        clock(),
        logger_name(module)
    );
    // One write per line so that lines of concurrent threads do not interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

#[macro_export]
macro_rules! log_debug {
    ($($arg:tt)*) => { $crate::logging::log($crate::logging::Level::Debug, module_path!(), format_args!($($arg)*)) };
}
#[macro_export]
macro_rules! log_info {
    ($($arg:tt)*) => { $crate::logging::log($crate::logging::Level::Info, module_path!(), format_args!($($arg)*)) };
}
#[macro_export]
macro_rules! log_warn {
    ($($arg:tt)*) => { $crate::logging::log($crate::logging::Level::Warning, module_path!(), format_args!($($arg)*)) };
}
#[macro_export]
macro_rules! log_error {
    ($($arg:tt)*) => { $crate::logging::log($crate::logging::Level::Error, module_path!(), format_args!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_names() {
        assert_eq!(Level::parse("debug"), Some(Level::Debug));
        assert_eq!(Level::parse("WARNING"), Some(Level::Warning));
        assert_eq!(Level::parse("30"), Some(Level::Warning));
        assert_eq!(Level::parse("loud"), None);
        assert_eq!(logger_name("shoal_frontend::engine"), "shoal.frontend.engine");
        assert_eq!(clock().len(), 8);
    }
}
