# Runs pulse-ingestor (release build). With no REDIS_URL set, starts a local redis-server
# (AOF on, data under .data/redis) and stops it on exit. Needs redis-server on PATH.
$ErrorActionPreference = "Stop"
Set-Location (Join-Path $PSScriptRoot "..")
if (Test-Path .env) {
  Get-Content .env | Where-Object { $_ -match '^\s*[A-Z_]+=' } | ForEach-Object {
    $k, $v = $_ -split '=', 2; [Environment]::SetEnvironmentVariable($k.Trim(), $v.Trim())
  }
}
$redis = $null
if (-not $env:REDIS_URL) {
  New-Item -ItemType Directory -Force .data/redis | Out-Null
  $redis = Start-Process redis-server -PassThru -NoNewWindow -ArgumentList @(
    "--port", "6379", "--bind", "127.0.0.1", "--dir", (Resolve-Path .data/redis),
    "--appendonly", "yes", "--appendfsync", "everysec", "--save", '""')
  $env:REDIS_URL = "redis://127.0.0.1:6379"
  Start-Sleep -Seconds 1
}
try {
  cargo build --release --bin pulse-ingestor
  & target/release/pulse-ingestor
} finally {
  if ($redis) { Stop-Process -Id $redis.Id -ErrorAction SilentlyContinue }
}
