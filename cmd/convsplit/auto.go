package main

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/torch"
)

type autoFlags struct {
	model, out, infoOut string
	verbose             bool
}

func parseAutoFlags(args []string, stderr io.Writer) (autoFlags, error) {
	var f autoFlags
	fs := flag.NewFlagSet("auto", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.model, "model", "", "TorchScript `file` with trained weights to decompose (required)")
	fs.StringVar(&f.out, "o", "", "output TorchScript `file` (required)")
	fs.StringVar(&f.infoOut, "info-out", "", "write the AMCT decomposition-information `file` here (required)")
	fs.BoolVar(&f.verbose, "v", false, "log each layer (mode, matrix size L x M, rank estimate, rank, seconds) to stderr")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: convsplit auto -model IN.pt -o OUT.pt -info-out INFO.json [-v]")
		fmt.Fprintln(stderr, "\nDecomposes every eligible Conv2d from its trained weights, as AMCT's auto_decomposition does.")
		fs.PrintDefaults()
	}
	if err := parseFlagSet(fs, args); err != nil {
		return f, err
	}
	switch {
	case f.model == "":
		return f, fmt.Errorf("%w: -model is required", errUsage)
	case f.out == "":
		return f, fmt.Errorf("%w: -o is required", errUsage)
	case f.infoOut == "":
		return f, fmt.Errorf("%w: -info-out is required", errUsage)
	}

	outputs := []struct{ flag, path string }{{"-o", f.out}, {"-info-out", f.infoOut}}
	for _, output := range outputs {
		same, err := sameFile(f.model, output.path)
		if err != nil {
			return f, err
		}
		if same {
			return f, fmt.Errorf("%w: %s %s would overwrite the input model; choose another output", errUsage, output.flag, output.path)
		}
	}
	if same, err := sameFile(f.out, f.infoOut); err != nil {
		return f, err
	} else if same {
		return f, fmt.Errorf("%w: -o and -info-out name the same file %s", errUsage, f.out)
	}
	return f, nil
}

func runAuto(args []string, stdout, stderr io.Writer) error {
	f, err := parseAutoFlags(args, stderr)
	if err != nil {
		return err
	}
	// On a terminal a progress bar shows each decomposed layer, and log
	// records pass through it so that they print above the bar.
	var bar *progressBar
	logOutput := stderr
	if isTerminal(stderr) {
		bar = &progressBar{w: stderr, start: time.Now()}
		logOutput = bar
	}
	setupLogging(logOutput, f.verbose)

	model, err := torch.Load(f.model)
	if err != nil {
		return err
	}
	defer model.Close()
	before, err := countParameters(model)
	if err != nil {
		return err
	}

	opts := decompose.AutoOptions{Logger: slog.Default()}
	if bar != nil {
		opts.Progress = bar.update
	}
	result, changes, info, err := decompose.Auto(model, opts)
	bar.finish()
	if err != nil {
		return err
	}
	defer result.Close()
	after, err := countParameters(result)
	if err != nil {
		return err
	}

	printChanges(stdout, changes)
	fmt.Fprintf(stdout, "parameters: %d before, %d after (%.1f%%)\n", before, after, 100*float64(after)/float64(max(before, 1)))
	if err := result.Save(f.out); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s\n", f.out)
	if err := info.WriteFile(f.infoOut); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s\n", f.infoOut)
	return nil
}

// isTerminal reports whether w is a terminal (a character device).
func isTerminal(w io.Writer) bool {
	file, ok := w.(*os.File)
	if !ok {
		return false
	}
	stat, err := file.Stat()
	return err == nil && stat.Mode()&os.ModeCharDevice != 0
}

// progressBar redraws one line on a terminal after each decomposed layer.
// Log records written through it go above the bar.
type progressBar struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
	// line is the bar as last drawn, or "" when no bar is on the screen.
	line string
}

const progressWidth = 30

// clearLine returns to the start of the line (\r) and clears it (\x1b[K).
const clearLine = "\r\x1b[K"

func (p *progressBar) update(done, total int, layer string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	filled := progressWidth * done / max(total, 1)
	bar := strings.Repeat("#", filled) + strings.Repeat("-", progressWidth-filled)
	p.line = fmt.Sprintf("[%s] %d/%d layers, %.1fs, %s", bar, done, total, time.Since(p.start).Seconds(), layer)
	io.WriteString(p.w, clearLine+p.line)
}

// Write clears the bar, writes data (a log record) and draws the bar again.
func (p *progressBar) Write(data []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.line != "" {
		io.WriteString(p.w, clearLine)
	}
	n, err := p.w.Write(data)
	if p.line != "" {
		io.WriteString(p.w, p.line)
	}
	return n, err
}

// finish ends the bar's line, so that later output starts on a new one.
func (p *progressBar) finish() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.line != "" {
		io.WriteString(p.w, "\n")
		p.line = ""
	}
}
