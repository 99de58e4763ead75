// Command convsplit restructures TorchScript models for tensor
// decomposition: it replaces the Conv2d layers listed in a Huawei AMCT
// decomposition-information file by pairs of smaller Conv2d layers.
//
// Usage:
//
//	convsplit apply   -model IN.pt -info INFO.json -o OUT.pt [-changes CHANGES.json] [-seed N] [-weights STATE.pt] [-dry-run] [-in-place] [-v]
//	convsplit auto    -model IN.pt -o OUT.pt -info-out INFO.json [-v]
//	convsplit inspect -model IN.pt [-info INFO.json] [-input 1x3x224x224]
//	convsplit bench   -model IN.pt -info INFO.json [-input ...] [-runs N] [-json] [-svg PLOT.svg]
//
// Exit status: 0 on success, 1 when the job fails, 2 for usage errors.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// errUsage marks errors in the command line; they exit with status 2.
var errUsage = errors.New("usage error")

// errHelp is returned when -h was given; the usage is already printed.
var errHelp = errors.New("help requested")

// parseFlagSet parses a subcommand's flags, which must take every
// argument: -h gives errHelp, anything else wrong wraps errUsage.
func parseFlagSet(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return errHelp
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	return nil
}

type command struct {
	name    string
	summary string
	run     func(args []string, stdout, stderr io.Writer) error
}

var commands = []command{
	{"apply", "replace the layers listed in an AMCT information file and save the model", runApply},
	{"inspect", "list every Conv2d with its geometry, AMCT's decision, parameters and MACs", runInspect},
	{"bench", "time loading, restructuring, saving and forward passes before and after", runBench},
	{"auto", "decompose every eligible Conv2d from its trained weights and write AMCT's information file", runAuto},
}

func main() {
	// With SIGPIPE ignored, a closed stdout (convsplit apply ... | head)
	// makes writes fail instead of killing the job before it saves.
	signal.Ignore(syscall.SIGPIPE)
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes one command line and returns the exit status.
func run(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "-help" || args[0] == "--help" || args[0] == "help" {
		printUsage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands {
		if c.name != args[0] {
			continue
		}
		err := c.run(args[1:], stdout, stderr)
		switch {
		case err == nil:
			return 0
		case errors.Is(err, errHelp):
			return 0
		case errors.Is(err, errUsage):
			fmt.Fprintf(stderr, "convsplit %s: %v\n", c.name, err)
			return 2
		default:
			fmt.Fprintf(stderr, "convsplit %s: %v\n", c.name, err)
			return 1
		}
	}
	fmt.Fprintf(stderr, "convsplit: unknown command %q\n", args[0])
	printUsage(stderr)
	return 2
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: convsplit COMMAND [flags]")
	fmt.Fprintln(w, "\ncommands:")
	for _, c := range commands {
		fmt.Fprintf(w, "  %-8s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun 'convsplit COMMAND -h' for the flags of a command.")
}

func setupLogging(stderr io.Writer, verbose bool) {
	level := slog.LevelWarn
	if verbose {
		level = slog.LevelDebug
	}
	slog.SetDefault(slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})))
}
