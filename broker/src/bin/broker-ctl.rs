//! `broker-ctl`: the control CLI of kontext-broker. See `kontext_broker::ctl`.

fn main() -> std::process::ExitCode {
    kontext_broker::ctl::main()
}
