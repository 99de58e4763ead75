package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/torch"
)

type applyFlags struct {
	model, info, out, changes string
	weights                   string
	seed                      int64
	seedSet, dryRun, inPlace  bool
	verbose                   bool
}

func parseApplyFlags(args []string, stderr io.Writer) (applyFlags, error) {
	var f applyFlags
	fs := flag.NewFlagSet("apply", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.model, "model", "", "TorchScript `file` to restructure (required)")
	fs.StringVar(&f.info, "info", "", "AMCT decomposition-information `file` (required)")
	fs.StringVar(&f.out, "o", "", "output TorchScript `file` (required unless -dry-run)")
	fs.StringVar(&f.changes, "changes", "", "write the changes to this JSON `file`, as AMCT's dict in file order")
	fs.Int64Var(&f.seed, "seed", 0, "seed torch's generator with `N` first, so new weights equal AMCT's after torch.manual_seed(N)")
	fs.StringVar(&f.weights, "weights", "", "load this torch.save'd state dict `file` (such as AMCT's decomposed weights) into the restructured model, strictly")
	fs.BoolVar(&f.dryRun, "dry-run", false, "check the file against the model and print the changes, writing nothing")
	fs.BoolVar(&f.inPlace, "in-place", false, "allow -o to name the input model file")
	fs.BoolVar(&f.verbose, "v", false, "log each step to stderr")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: convsplit apply -model IN.pt -info INFO.json -o OUT.pt [-changes CHANGES.json] [-seed N] [-weights STATE.pt] [-dry-run]")
		fs.PrintDefaults()
	}
	if err := parseFlagSet(fs, args); err != nil {
		return f, err
	}
	fs.Visit(func(fl *flag.Flag) {
		if fl.Name == "seed" {
			f.seedSet = true
		}
	})
	switch {
	case f.model == "":
		return f, fmt.Errorf("%w: -model is required", errUsage)
	case f.info == "":
		return f, fmt.Errorf("%w: -info is required", errUsage)
	case f.out == "" && !f.dryRun:
		return f, fmt.Errorf("%w: -o is required (or use -dry-run)", errUsage)
	case f.seed < 0:
		return f, fmt.Errorf("%w: -seed must be non-negative, got %d", errUsage, f.seed)
	}
	if !f.dryRun {
		for _, input := range []string{f.model, f.info} {
			same, err := sameFile(input, f.out)
			if err != nil {
				return f, err
			}
			if same && !(f.inPlace && input == f.model) {
				return f, fmt.Errorf("%w: -o %s would overwrite the input %s; choose another output or pass -in-place", errUsage, f.out, input)
			}
		}
		if f.changes != "" {
			for _, input := range []string{f.model, f.info, f.out} {
				if same, err := sameFile(input, f.changes); err != nil {
					return f, err
				} else if same {
					return f, fmt.Errorf("%w: -changes %s names the file %s", errUsage, f.changes, input)
				}
			}
		}
	}
	return f, nil
}

// sameFile reports whether a and b name the same file; a b that does not
// exist yet is a different file.
func sameFile(a, b string) (bool, error) {
	if filepath.Clean(a) == filepath.Clean(b) {
		return true, nil
	}
	sa, errA := os.Stat(a)
	sb, errB := os.Stat(b)
	if errA != nil || errB != nil {
		return false, nil
	}
	return os.SameFile(sa, sb), nil
}

func runApply(args []string, stdout, stderr io.Writer) error {
	f, err := parseApplyFlags(args, stderr)
	if err != nil {
		return err
	}
	setupLogging(stderr, f.verbose)

	info, err := decompose.ReadInfo(f.info)
	if err != nil {
		return err
	}
	model, err := torch.Load(f.model)
	if err != nil {
		return err
	}
	defer model.Close()
	before, err := countParameters(model)
	if err != nil {
		return err
	}

	if f.seedSet {
		torch.ManualSeed(uint64(f.seed))
	}
	result, changes, err := decompose.NetworkInfo(model, info, f.info)
	if err != nil {
		return err
	}
	defer result.Close()
	if f.weights != "" {
		report, err := result.LoadStateDictFromFile(f.weights, true)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "loaded %d tensors from %s\n", len(report.Loaded), f.weights)
	}
	after, err := countParameters(result)
	if err != nil {
		return err
	}

	printChanges(stdout, changes)
	fmt.Fprintf(stdout, "parameters: %d before, %d after (%.1f%%)\n", before, after, 100*float64(after)/float64(max(before, 1)))
	if f.dryRun {
		fmt.Fprintln(stdout, "dry run: nothing written")
		return nil
	}

	// The changes file is written out before the model is saved and renamed
	// into place after, so that a folder that cannot take it fails the job
	// before the output model is replaced.
	var changesTmp string
	if f.changes != "" {
		data, err := changes.MarshalJSON()
		if err != nil {
			return err
		}
		if changesTmp, err = stageFile(f.changes, append(data, '\n')); err != nil {
			return fmt.Errorf("writing changes %s: %w", f.changes, err)
		}
		defer os.Remove(changesTmp) // fails harmlessly after the rename
	}

	if err := result.Save(f.out); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s\n", f.out)
	if f.changes != "" {
		if err := os.Rename(changesTmp, f.changes); err != nil {
			return fmt.Errorf("writing changes %s: %w", f.changes, err)
		}
		fmt.Fprintf(stdout, "wrote %s\n", f.changes)
	}
	return nil
}

func countParameters(m *torch.Module) (int64, error) {
	entries, err := m.StateDict()
	if err != nil {
		return 0, err
	}
	var total int64
	for _, e := range entries {
		if !e.Parameter {
			continue
		}
		n := int64(1)
		for _, s := range e.Shape {
			n *= s
		}
		total += n
	}
	return total, nil
}

func printChanges(w io.Writer, changes decompose.Changes) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tNEW LAYERS")
	for _, c := range changes {
		name := c.Layer
		if name == "" {
			name = `""`
		}
		fmt.Fprintf(tw, "%s\t%s\n", name, strings.Join(c.NewLayers[:], ", "))
	}
	tw.Flush()
	if len(changes) == 1 {
		fmt.Fprintln(w, "1 layer replaced")
	} else {
		fmt.Fprintf(w, "%d layers replaced\n", len(changes))
	}
}

// writeFileAtomic writes data to a temporary file beside path and renames
// it, so path never holds a partial file.
func writeFileAtomic(path string, data []byte) error {
	tmp, err := stageFile(path, data)
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// stageFile writes data to a synced temporary file beside path and returns
// its name; renaming it to path completes the write.
func stageFile(path string, data []byte) (string, error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return "", err
	}
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if closeErr := tmp.Close(); err == nil {
		err = closeErr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return "", err
	}
	return tmp.Name(), nil
}
