//! `broker-ctl`: the control CLI of kontext-broker. See `kontext_broker_ctl::cli`.

fn main() -> std::process::ExitCode {
    kontext_broker_ctl::cli::main()
}
