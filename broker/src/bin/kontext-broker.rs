//! `kontext-broker`: the per-user token broker daemon. See `daemon` for the work.

use clap::Parser;

fn main() {
    let args = kontext_broker::daemon::Args::parse();
    if let Err(e) = kontext_broker::daemon::run(args) {
        // One line: the cause chain, outermost first.
        eprintln!("kontext-broker: {e:#}");
        std::process::exit(1);
    }
}
