// Command rewrite restructures a TorchScript model as AMCT's
// decompose_network does: every Conv2d named in a decomposition-information
// file becomes a Sequential of two default-initialized Conv2d layers. It
// prints the changes and saves the model, which Python's torch.jit.load reads.
//
// From the repository root, after `make fixtures`:
//
//	go run ./examples/rewrite
//
// With -seed 1234 the new weights equal those of AMCT's reference run in
// testdata/amct.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/torch"
)

func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("rewrite", flag.ContinueOnError)
	fs.SetOutput(stderr)
	model := fs.String("model", "build/fixtures/mixed.pt", "TorchScript `file` to restructure")
	info := fs.String("info", "testdata/amct/mixed/decompose_info.json", "AMCT decomposition-information `file`")
	out := fs.String("o", "build/rewrite/mixed.pt", "output TorchScript `file`")
	changesPath := fs.String("changes", "", "also write the changes to this JSON `file`")
	seed := fs.Int64("seed", -1, "seed torch's generator with `N` first, as torch.manual_seed(N) does; -1 leaves it alone")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}

	m, err := torch.Load(*model)
	if err != nil {
		return err
	}
	defer m.Close()
	if *seed >= 0 {
		torch.ManualSeed(uint64(*seed))
	}
	result, changes, err := decompose.Network(m, *info)
	if err != nil {
		return err
	}
	defer result.Close()
	for _, c := range changes {
		fmt.Fprintf(stdout, "%q -> %q, %q\n", c.Layer, c.NewLayers[0], c.NewLayers[1])
	}

	if err := os.MkdirAll(filepath.Dir(*out), 0o755); err != nil {
		return err
	}
	if err := result.Save(*out); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s\n", *out)
	if *changesPath != "" {
		data, err := changes.MarshalJSON()
		if err != nil {
			return err
		}
		if err := os.WriteFile(*changesPath, append(data, '\n'), 0o644); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "wrote %s\n", *changesPath)
	}
	return nil
}

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "rewrite:", err)
		os.Exit(1)
	}
}
