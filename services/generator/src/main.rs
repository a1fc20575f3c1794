#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = jetcall::Config::load()?;
    jetcall::telemetry::init(&config.log);
    generator::run(config, jetcall::shutdown::on_signal()).await?;
    Ok(())
}
