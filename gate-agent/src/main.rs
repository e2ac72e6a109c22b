//! `gate-agent --config FILE` (see `gate_agent::cli`).

fn main() -> anyhow::Result<()> {
    gate_agent::cli::gate_agent(std::env::args_os())
}
