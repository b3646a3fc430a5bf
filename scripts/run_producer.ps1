# Runs the load simulator with the earlier producer's defaults; extra arguments are passed on.
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..")
cargo build --release --bin pulse-producer
& target/release/pulse-producer --mode tenants --tenants 3000 --skus 10 `
  --min-delay 500ms --max-delay 1000ms --duration 100s @args
