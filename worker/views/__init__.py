"""Read-side views: HTML reports, queue ETAs, sweeps and their comparison."""
