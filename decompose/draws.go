package decompose

import (
	"fmt"

	"github.com/convsplit/convsplit/torch"
)

// layerParameters are the tensors drawn for one entry's new layers: the
// first layer's weight, the last layer's weight and its bias (nil without).
type layerParameters struct {
	firstWeight, lastWeight, lastBias *torch.Tensor
}

func (p layerParameters) close() {
	p.firstWeight.Close()
	p.lastWeight.Close()
	p.lastBias.Close()
}

// newLayerParameters allocates the new layers' tensors without drawing them.
func newLayerParameters(l plannedLayer) (layerParameters, error) {
	first, _, err := torch.NewConv2dParameters(spec(l.first, l))
	if err != nil {
		return layerParameters{}, fmt.Errorf("first layer: %w", err)
	}
	last, bias, err := torch.NewConv2dParameters(spec(l.last, l))
	if err != nil {
		first.Close()
		return layerParameters{}, fmt.Errorf("last layer: %w", err)
	}
	return layerParameters{firstWeight: first, lastWeight: last, lastBias: bias}, nil
}

// drawer draws the queued tensors on its own goroutine, in queue order, so
// that the caller can plan the next layers, build the new types and check
// the model meanwhile. The order is AMCT's: for each entry the first layer's weight, then the
// last layer's weight and bias, as each torch.nn.Conv2d's constructor draws
// its own.
type drawer struct {
	queue chan layerParameters
	done  chan error
	// queued are the tensors handed to the goroutine, in order. Only the
	// caller's goroutine touches it.
	queued           []layerParameters
	started, stopped bool
	err              error
}

func newDrawer(capacity int) *drawer {
	return &drawer{queue: make(chan layerParameters, capacity), done: make(chan error, 1)}
}

// start starts drawing the tensors queued so far and those queued later.
func (d *drawer) start() {
	d.started = true
	go d.run()
}

func (d *drawer) run() {
	var err error
	for p := range d.queue {
		if err != nil {
			continue // drain the queue after a failure
		}
		if err = torch.DrawConv2dParameters(p.firstWeight, nil); err == nil {
			err = torch.DrawConv2dParameters(p.lastWeight, p.lastBias)
		}
	}
	d.done <- err
}

// add queues one entry's tensors for drawing.
func (d *drawer) add(p layerParameters) {
	d.queued = append(d.queued, p)
	d.queue <- p
}

// wait ends the queue, waits for every queued draw and returns the first
// error. It may be called more than once, and returns nil at once if the
// drawing never started.
func (d *drawer) wait() error {
	if d.started && !d.stopped {
		close(d.queue)
		d.err = <-d.done
		d.stopped = true
	}
	return d.err
}

// close waits for the draws, releases the handles of the tensors and
// returns wait's error.
func (d *drawer) close() error {
	err := d.wait()
	for _, p := range d.queued {
		p.close()
	}
	d.queued = nil
	return err
}
