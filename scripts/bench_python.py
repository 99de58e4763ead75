#!/usr/bin/python3
"""Python baselines for convsplit's benchmarks, and convsplit apply measured the same way.

Usage:
  /usr/bin/python3 scripts/bench_python.py load-save [--runs N] [--json] [--convsplit BIN]
                                                     [--workdir DIR] MODEL.pt INFO.json
  /usr/bin/python3 scripts/bench_python.py decompose [--runs N] [--json] NAME

load-save runs each measurement in a fresh process, N times (default 3), and reports
the median. The runs go in rounds of one of each, and os.sync() runs before each one
so that it does not pay for writing back the files of the runs before it. A
temporary folder (in --workdir, default the system's) contains the files written and
is removed at the end.

  python load+save   torch.jit.load(MODEL) then module.save(OUT) with Debian's torch,
                     timed inside the process after `import torch`; peak RSS from
                     resource.getrusage(RUSAGE_SELF).ru_maxrss, which includes the
                     interpreter and torch's own libraries
  ... + fsync        the same, then os.fsync on OUT, because convsplit's Save syncs
                     the file to disk before renaming it into place
  python import      a process that only imports torch: the part of the RSS above
                     that is not the model, and the start-up time of the processes
                     above (each python row also gives its whole process's time)
  convsplit help     BIN help: the start-up of a convsplit process, most of it
                     loading libtorch's shared libraries and running their static
                     initializers
  convsplit apply    BIN apply -model MODEL -info INFO -o OUT under /usr/bin/time -v:
                     wall-clock time of the whole process (start-up and libtorch's
                     loading included) and "Maximum resident set size"; minus the
                     start-up's median, an estimate of its in-process time

decompose times, in one process, N runs (default 20) after one warm-up run on the
eager zoo model NAME of testdata/amct/zoo_models.py with its decompose_info.json:

  decompose_network  scripts/amct_eager.py's decompose_network, an independent eager
                     reimplementation of AMCT's (not AMCT itself), on a fresh model
                     each run; building the model is not timed
  draws              only the torch.nn.Conv2d constructors of the new layers, which
                     draw the default-initialized weights as AMCT's do

with wall-clock time (median and fastest run) and CPU time (time.process_time), so
that convsplit's figures can be compared with Python's on the same machine at the
same time.

Times are in seconds and memory in MB (10^6 bytes). load-save needs /usr/bin/time
(Debian package time) and a built convsplit (make build).
"""
import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PYTHON = '/usr/bin/python3'
REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))


def child_load_save(model, out, sync):
    """Run in a child process: load and save one TorchScript file, print a JSON record."""
    import torch  # noqa: F401  (imported first so that its cost stays out of the timing)
    start = time.perf_counter()
    module = torch.jit.load(model)
    loaded = time.perf_counter()
    module.save(out)
    if sync:
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    saved = time.perf_counter()
    print(json.dumps({
        'load_s': loaded - start,
        'save_s': saved - loaded,
        'total_s': saved - start,
        'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6,
    }))


def child_import():
    """Run in a child process: import torch and print the peak RSS."""
    import torch  # noqa: F401
    print(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6}))


def run_child(*args):
    """Run this script in a child mode and return its JSON record, with the
    wall-clock time of the whole child process as process_s."""
    start = time.perf_counter()
    out = subprocess.run([PYTHON, os.path.abspath(__file__)] + list(args),
                         check=True, capture_output=True, text=True)
    record = json.loads(out.stdout)
    record['process_s'] = time.perf_counter() - start
    return record


def parse_time_v(text):
    """Return (wall seconds, max RSS MB) from the report of /usr/bin/time -v."""
    wall = re.search(r'Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)', text)
    rss = re.search(r'Maximum resident set size \(kbytes\): (\d+)', text)
    if not wall or not rss:
        raise RuntimeError('unexpected /usr/bin/time output:\n' + text)
    seconds = 0.0
    for part in wall.group(1).split(':'):
        seconds = seconds * 60 + float(part)
    return seconds, int(rss.group(1)) * 1024 / 1e6


def run_apply(binary, model, info, out):
    """Run convsplit apply under /usr/bin/time -v and return its record."""
    if os.path.exists(out):
        os.remove(out)
    proc = subprocess.run(['/usr/bin/time', '-v', binary, 'apply', '-model', model, '-info', info, '-o', out],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError('convsplit apply failed:\n' + proc.stdout + proc.stderr)
    wall, rss = parse_time_v(proc.stderr)
    return {'wall_s': wall, 'peak_rss_mb': rss}


def run_startup(binary):
    """Time `convsplit help`, which only starts the process and loads libtorch."""
    start = time.perf_counter()
    subprocess.run([binary, 'help'], check=True, capture_output=True)
    return {'wall_s': time.perf_counter() - start}


def median_record(records):
    """Return the median of every field over the records."""
    return {key: statistics.median(r[key] for r in records) for key in records[0]}


def measure(args, workdir):
    """Run every measurement args.runs times and return the medians."""
    out = os.path.join(workdir, 'out.pt')
    results = {
        'model': args.model,
        'info': args.info,
        'file_mb': os.path.getsize(args.model) / 1e6,
        'runs': args.runs,
        'torch': subprocess.run([PYTHON, '-c', 'import torch; print(torch.__version__)'],
                                check=True, capture_output=True, text=True).stdout.strip(),
    }
    measurements = (
        ('python_import', lambda: run_child('_import')),
        ('python_load_save', lambda: run_child('_load_save', args.model, out, '0')),
        ('python_load_save_fsync', lambda: run_child('_load_save', args.model, out, '1')),
        ('convsplit_startup', lambda: run_startup(args.convsplit)),
        ('convsplit_apply', lambda: run_apply(args.convsplit, args.model, args.info, out)),
    )
    records = {key: [] for key, _ in measurements}
    # Rounds interleave the measurements, and os.sync() before each one writes
    # back what earlier runs left in the page cache, so that no run pays for
    # the write-back of another.
    for _ in range(args.runs):
        for key, measurement in measurements:
            os.sync()
            records[key].append(measurement())
    for key, values in records.items():
        results[key] = median_record(values)

    apply, python = results['convsplit_apply'], results['python_load_save']
    results['time_ratio'] = apply['wall_s'] / python['total_s']
    results['time_ratio_fsync'] = apply['wall_s'] / results['python_load_save_fsync']['total_s']
    results['process_ratio'] = apply['wall_s'] / python['process_s']
    # An estimate: the medians of two different runs are subtracted.
    results['apply_after_startup_s'] = apply['wall_s'] - results['convsplit_startup']['wall_s']
    results['time_ratio_after_startup'] = results['apply_after_startup_s'] / python['total_s']
    results['memory_limit_mb'] = 1.5 * results['file_mb'] + 300
    return results


def print_markdown(r):
    """Print the results as Markdown tables."""
    print('model %s (%.0f MB), torch %s, median of %d runs' % (r['model'], r['file_mb'], r['torch'], r['runs']))
    print()
    print('| measurement | in-process time (s) | whole process (s) | peak RSS (MB) |')
    print('| --- | ---: | ---: | ---: |')
    imp, ls, lsf = r['python_import'], r['python_load_save'], r['python_load_save_fsync']
    print('| python: import torch only | | %.2f | %.0f |' % (imp['process_s'], imp['peak_rss_mb']))
    print('| python: torch.jit.load + save | %.2f (load %.2f, save %.2f) | %.2f | %.0f |'
          % (ls['total_s'], ls['load_s'], ls['save_s'], ls['process_s'], ls['peak_rss_mb']))
    print('| python: torch.jit.load + save + fsync | %.2f (load %.2f, save %.2f) | %.2f | %.0f |'
          % (lsf['total_s'], lsf['load_s'], lsf['save_s'], lsf['process_s'], lsf['peak_rss_mb']))
    print('| convsplit help (start-up only) | | %.2f | |' % r['convsplit_startup']['wall_s'])
    print('| convsplit apply | (%.2f after start-up, estimate) | %.2f | %.0f |'
          % (r['apply_after_startup_s'], r['convsplit_apply']['wall_s'], r['convsplit_apply']['peak_rss_mb']))
    print()
    print('convsplit apply (whole process) / python load+save (in-process): %.2fx, %.2fx against the fsync variant'
          % (r['time_ratio'], r['time_ratio_fsync']))
    print('convsplit apply after start-up (estimate) / python load+save (in-process): %.2fx'
          % r['time_ratio_after_startup'])
    print('convsplit apply / python load+save, both whole processes: %.2fx' % r['process_ratio'])
    print('convsplit apply peak RSS: %.0f MB; 1.5 x file size + 300 MB = %.0f MB'
          % (r['convsplit_apply']['peak_rss_mb'], r['memory_limit_mb']))


def time_decompose(name, runs):
    """Time amct_eager.decompose_network and the Conv2d constructors alone on zoo model name."""
    sys.path.insert(0, os.path.join(REPO, 'scripts'))
    import torch
    import amct_eager
    import zoo_models

    info = amct_eager.load_info(os.path.join(REPO, 'testdata', 'amct', name, 'decompose_info.json'))
    shapes = [(e['decom_nodes'][k]['weight_shape'], k == 'last') for e in info for k in ('first', 'last')]

    def draws():
        for (out_channels, in_channels, kh, kw), bias in shapes:
            torch.nn.Conv2d(in_channels, out_channels, (kh, kw), bias=bias)

    records = {'decompose_network': [], 'draws': []}
    for run in range(runs + 1):
        model = zoo_models.build(name).eval()
        for key, work in (('decompose_network', lambda: amct_eager.decompose_network(model, info)), ('draws', draws)):
            wall, cpu = time.perf_counter(), time.process_time()
            work()
            record = {'wall_s': time.perf_counter() - wall, 'cpu_s': time.process_time() - cpu}
            if run > 0:  # the first run warms up
                records[key].append(record)
    result = {'model': name, 'layers': len(info), 'runs': runs, 'threads': torch.get_num_threads()}
    for key, values in records.items():
        result[key] = median_record(values)
        result[key]['min_wall_s'] = min(v['wall_s'] for v in values)
    return result


def print_decompose(r):
    """Print the decompose timings as a Markdown table."""
    print('zoo model %s, %d layers, median of %d runs, %d intra-op threads' % (r['model'], r['layers'], r['runs'], r['threads']))
    print()
    print('| measurement | wall, median (ms) | wall, fastest (ms) | CPU, median (ms) |')
    print('| --- | ---: | ---: | ---: |')
    for key, label in (('decompose_network', 'amct_eager.decompose_network'), ('draws', 'nn.Conv2d constructors (draws)')):
        print('| %s | %.2f | %.2f | %.2f |'
              % (label, 1e3 * r[key]['wall_s'], 1e3 * r[key]['min_wall_s'], 1e3 * r[key]['cpu_s']))


def main(argv):
    if argv and argv[0] == '_load_save':
        child_load_save(argv[1], argv[2], argv[3] == '1')
        return 0
    if argv and argv[0] == '_import':
        child_import()
        return 0

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    load_save = commands.add_parser('load-save', help='time load+save in Python and convsplit apply')
    load_save.add_argument('model', help='TorchScript file, such as build/fixtures/vgg16.pt')
    load_save.add_argument('info', help='AMCT decomposition-information file for convsplit apply')
    load_save.add_argument('--runs', type=int, default=3, help='runs of each measurement (default 3)')
    load_save.add_argument('--json', action='store_true', help='print one JSON object instead of tables')
    load_save.add_argument('--convsplit', default=os.path.join(REPO, 'bin', 'convsplit'),
                           help='convsplit binary (default bin/convsplit)')
    load_save.add_argument('--workdir', default=None, help='folder for the temporary output files')
    decompose = commands.add_parser('decompose', help='time the eager decompose_network and its draws')
    decompose.add_argument('name', help='zoo model with a folder in testdata/amct, such as resnet50')
    decompose.add_argument('--runs', type=int, default=20, help='timed runs (default 20)')
    decompose.add_argument('--json', action='store_true', help='print one JSON object instead of a table')
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error('--runs must be at least 1')

    if args.command == 'decompose':
        if not os.path.exists(os.path.join(REPO, 'testdata', 'amct', args.name, 'decompose_info.json')):
            parser.error('testdata/amct/%s/decompose_info.json not found' % args.name)
        results = time_decompose(args.name, args.runs)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print_decompose(results)
        return 0

    for path in (args.model, args.info, args.convsplit, '/usr/bin/time'):
        if not os.path.exists(path):
            parser.error('%s not found' % path)
    workdir = tempfile.mkdtemp(prefix='convsplit-bench-', dir=args.workdir)
    try:
        results = measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_markdown(results)
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
